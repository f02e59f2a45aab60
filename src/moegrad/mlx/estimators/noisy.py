"""Noisy top-k gating (Shazeer et al. 2017; MLX twin of :mod:`moegrad.estimators.noisy`)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from moegrad.mlx.estimators.base import Estimator, Picked
from moegrad.mlx.ops import ndtr, topk


def smooth_load(clean: mx.array, noisy: mx.array, noise_std: mx.array, k: int) -> mx.array:
    """Shazeer's smooth load P(x, i) [T, E] = Phi((clean_i - threshold_i) / sigma_i).

    threshold_i is the k-th largest noisy logit excluding i: the (k+1)-th largest if i is in
    the noisy top-k, the k-th largest otherwise. clean, noisy, noise_std: [T, E].
    """
    if k >= clean.shape[-1]:
        return mx.ones_like(clean)
    top, _ = topk(noisy, k + 1)  # [T, K+1] descending, differentiable
    threshold_if_in = top[:, k:k + 1]
    threshold_if_out = top[:, k - 1:k]
    is_in = noisy > threshold_if_in
    prob_if_in = ndtr((clean - threshold_if_in) / noise_std)
    prob_if_out = ndtr((clean - threshold_if_out) / noise_std)
    return mx.where(is_in, prob_if_in, prob_if_out)


class NoisyTopK(Estimator):
    """``noisy_topk``: H = z + eps sigma, sigma = softplus(x W_noise^T) + noise_epsilon.

    eps ~ N(0, 1) in training mode only (eval: H = z). S = TopK(H); w = c softmax(H_S).
    Router gradient: autograd through H_S, reaching the gate and, through sigma, ``w_noise``
    [E, D] (trainable, zero-initialised). ``Routing.load_probs`` is the smooth load
    (:func:`smooth_load`) for the ``importance_load`` loss, ``Routing.noise_std`` sigma.

    Options: ``noise_epsilon`` >= 0 (default 1e-2), ``seed`` (None: global RNG).
    """

    name = "noisy_topk"

    def __init__(self, config, **options) -> None:
        super().__init__(config, **options)
        self.w_noise = mx.zeros((config.num_experts, config.dim), dtype=mx.float32)

    def route(self, x, z, scores, selection) -> Picked:
        sigma = nn.softplus(x @ self.w_noise.astype(mx.float32).T) + self.noise_epsilon  # [T, E]
        noisy = z + self._noise.normal(z.shape) * sigma if self.training else z
        values, indices = topk(noisy, self.config.top_k)
        w = mx.softmax(values, axis=-1, precise=True)
        c = self.config.routed_scaling_factor
        load = smooth_load(z, noisy, sigma, self.config.top_k)
        return Picked(indices, w * c if c != 1.0 else w, load_probs=load, noise_std=sigma)
