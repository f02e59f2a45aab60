"""Noisy top-k gating (Shazeer et al. 2017, section 2.1 and appendix A)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moegrad.estimators.base import Estimator, Picked


def smooth_load(clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """Shazeer's smooth load P(x, i) [T, E] = Phi((clean_i - threshold_i) / sigma_i).

    threshold_i is the k-th largest noisy logit excluding i: the (k+1)-th largest of all if i
    is in the noisy top-k, the k-th largest otherwise. P(x, i) is the probability that i is in
    the top-k when only its own noise is redrawn. clean, noisy, noise_std: [T, E].
    """
    num_experts = clean.shape[-1]
    if k >= num_experts:
        return torch.ones_like(clean)
    top = noisy.topk(k + 1, dim=-1).values  # [T, K+1]
    threshold_if_in = top[:, k:k + 1]
    threshold_if_out = top[:, k - 1:k]
    is_in = noisy > threshold_if_in
    prob_if_in = torch.special.ndtr((clean - threshold_if_in) / noise_std)
    prob_if_out = torch.special.ndtr((clean - threshold_if_out) / noise_std)
    return torch.where(is_in, prob_if_in, prob_if_out)


class NoisyTopK(Estimator):
    """``noisy_topk``: H = z + eps * sigma, sigma = softplus(x W_noise^T) + noise_epsilon.

    eps ~ N(0, 1) in training mode only (eval: H = z). S = TopK(H); weights
    w = c * softmax(H_S) over the K kept logits (already normalised: ``normalize`` and ``score``
    do not change them). Router gradient: autograd through the kept logits H_S, reaching the
    gate and, through sigma, the noise weight ``w_noise`` [E, D] (zero-initialised as in the
    paper). ``Routing.load_probs`` carries the smooth load P(x, i) (:func:`smooth_load`) that
    the ``importance_load`` balance loss needs, and ``Routing.noise_std`` sigma.

    Options: ``noise_epsilon`` >= 0 (default 1e-2, keeps sigma away from 0), ``generator``.
    """

    name = "noisy_topk"

    def __init__(self, config, **options) -> None:
        super().__init__(config, **options)
        self.w_noise = nn.Parameter(torch.zeros(config.num_experts, config.dim))

    def route(self, x, z, scores, selection) -> Picked:
        sigma = F.softplus(F.linear(x, self.w_noise.to(x.dtype))) + self.noise_epsilon  # [T, E]
        if self.training:
            eps = torch.randn(z.shape, generator=self.generator, device=z.device, dtype=z.dtype)
            noisy = z + eps * sigma
        else:
            noisy = z
        kept = noisy.topk(self.config.top_k, dim=-1)
        w = torch.softmax(kept.values, dim=-1)
        c = self.config.routed_scaling_factor
        load = smooth_load(z, noisy, sigma, self.config.top_k)
        return Picked(kept.indices, w * c if c != 1.0 else w, load_probs=load, noise_std=sigma)
