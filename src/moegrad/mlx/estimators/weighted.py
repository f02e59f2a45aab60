"""Estimators that keep the deterministic top-k and differ only in the combine weights
(MLX twins of :mod:`moegrad.estimators.weighted`; see there for the maths).

Notation per token: s [E] scores, S the K selected experts, e_i = E_i(x), g = dL/dy,
c = routed_scaling_factor.
"""

from __future__ import annotations

import mlx.core as mx

from moegrad.mlx.estimators.base import Estimator, Picked, topk_picked


class TopK(Estimator):
    """``topk``: y = sum_S w_i e_i, w = c * s_S (renormalised if ``normalize``); plain autograd:
    dL/ds_i = <g, e_i> dw/ds_i for i in S, 0 otherwise. Top-1 renormalised: no router gradient."""

    name = "topk"

    def route(self, x, z, scores, selection) -> Picked:
        return topk_picked(scores, selection)


class Unweighted(Estimator):
    """``unweighted``: y = sum_S e_i with constant unit weights; no router task gradient."""

    name = "unweighted"

    def route(self, x, z, scores, selection) -> Picked:
        indices = selection.select_topk(scores)
        return Picked(indices, mx.ones(indices.shape, dtype=scores.dtype))


class StraightThrough(Estimator):
    """``straight_through``: w_i = c (1 + s_i - sg(s_i)): value c, dL/ds_i = c <g, e_i> for i in S.

    The straight-through estimator (Bengio et al. 2013) applied to the combine weights; raw
    scores, so ``normalize`` does not change the gradient.
    """

    name = "straight_through"

    def route(self, x, z, scores, selection) -> Picked:
        indices = selection.select_topk(scores)
        s = mx.take_along_axis(scores, indices, axis=-1)
        w = 1.0 + (s - mx.stop_gradient(s))  # exactly 1 in value (no rounding of 1 + s - s)
        c = selection.config.routed_scaling_factor
        return Picked(indices, w * c if c != 1.0 else w)
