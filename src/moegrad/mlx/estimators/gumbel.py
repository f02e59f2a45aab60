"""Gumbel-top-k with a relaxed softmax (MLX twin of :mod:`moegrad.estimators.gumbel`)."""

from __future__ import annotations

import mlx.core as mx

from moegrad.mlx.estimators.base import Estimator, Picked
from moegrad.mlx.ops import topk_indices


class Gumbel(Estimator):
    """``gumbel``: S = TopK((z + G) / tau), G ~ Gumbel(0, 1) in training mode (eval: G = 0).

    p = softmax((z + G) / tau); soft weights w_i = c p_i for i in S (renormalised over S if
    ``normalize``); ``hard=True``: w = c (1 + p_S - sg(p_S)) (unit forward, soft gradient).
    Router gradient: autograd through the relaxed softmax,
    dL/dz_j = sum_{i in S} <g, e_i> c p_i (delta_ij - p_j) / tau.

    Options: ``tau`` > 0 (default 1.0), ``hard`` (default False), ``seed`` (None: global RNG).
    """

    name = "gumbel"

    def route(self, x, z, scores, selection) -> Picked:
        perturbed = z + self._noise.gumbel(z.shape) if self.training else z
        p = mx.softmax(perturbed / self.tau, axis=-1, precise=True)  # [T, E]
        indices = topk_indices(p, self.config.top_k)
        w = mx.take_along_axis(p, indices, axis=-1)
        if self.config.normalize:
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
        if self.hard:
            w = 1.0 + (w - mx.stop_gradient(w))  # exactly 1 in value
        c = self.config.routed_scaling_factor
        return Picked(indices, w * c if c != 1.0 else w)
