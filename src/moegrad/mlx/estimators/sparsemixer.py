"""SparseMixer-v2 as in GRIN / PhiMoE (MLX twin of :mod:`moegrad.estimators.sparsemixer`)."""

from __future__ import annotations

import mlx.core as mx

from moegrad.mlx.estimators.base import Estimator, Picked


class SparseMixer(Estimator):
    """``sparsemixer``: K picks, each a masked Gumbel-max sample with a Heun-rule multiplier.

    Pick j works on z^(j), the logits with earlier picks at -inf; M = max z^(j):

    * mask: drop expert i where (M - z_i) / max(|z_i|, M) > 2 jitter_eps;
    * p = softmax(masked z^(j)); D = argmax(masked z^(j) + G) (training) or argmax z^(j) (eval);
    * forward weight m p_D, m = 1 if D is the argmax or with probability 1/4, else 1/3;
      eval: m = 1.

    Router gradient: that of h = p_D e_D alone (w = p_D + sg(m p_D - p_D)):
    dL/dz_i = <g, e_D> p_D (delta_iD - p_i), zero for masked experts. ``routed_scaling_factor``
    multiplies the weights; ``normalize`` and ``score`` do not apply.

    Options: ``jitter_eps`` >= 0 (default 0.01), ``seed`` (None: global RNG).
    """

    name = "sparsemixer"

    def route(self, x, z, scores, selection) -> Picked:
        num_experts = z.shape[-1]
        if z.shape[0] == 0:
            return Picked(mx.zeros((0, self.config.top_k), dtype=mx.uint32),
                          mx.zeros((0, self.config.top_k), dtype=mx.float32))
        current = z
        picks, weights = [], []
        for _ in range(self.config.top_k):
            masked, top = self._mask(current, z)
            p = mx.softmax(masked, axis=-1, precise=True)
            if self.training:
                noisy = mx.stop_gradient(masked) + self._noise.gumbel(masked.shape)
                pick = mx.argmax(noisy, axis=-1, keepdims=True)
                lucky = self._noise.uniform((z.shape[0], 1)) < 0.25
                m = mx.where((pick == top) | lucky, 1.0, 1.0 / 3.0)
                p_pick = mx.take_along_axis(p, pick, axis=-1)
                w = p_pick + mx.stop_gradient(m * p_pick - p_pick)
            else:
                pick = top
                w = mx.take_along_axis(p, pick, axis=-1)
            pick = mx.stop_gradient(pick)
            picks.append(pick)
            weights.append(w)
            current = mx.where(pick == mx.arange(num_experts), -mx.inf, current)
        w = mx.concatenate(weights, axis=1)
        c = self.config.routed_scaling_factor
        return Picked(mx.concatenate(picks, axis=1), w * c if c != 1.0 else w)

    def _mask(self, current: mx.array, z: mx.array):
        """current [T, E] (earlier picks at -inf), z [T, E] -> masked logits, argmax [T, 1]."""
        cur, zz = mx.stop_gradient(current), mx.stop_gradient(z)
        best = cur.max(axis=-1, keepdims=True)
        top = mx.argmax(cur, axis=-1, keepdims=True)
        factor = mx.maximum(mx.abs(zz), best)
        drop = (best - zz) / factor > 2 * self.jitter_eps
        return mx.where(drop, -mx.inf, current), top
