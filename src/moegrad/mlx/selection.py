"""The deterministic top-k selection and its combine weights, in MLX (the twin of
:mod:`moegrad.selection`).

Shapes: T tokens, E experts, K top-k. A :class:`Selection` is built by the router for each call
from its :class:`~moegrad._spec.RouterConfig` and its optional selection-only bias b [E]:

    S = TopK(s + b)             [T, K]  group-limited top-k (DeepSeek-V3) may first mask whole
                                        groups of experts: keep the ``topk_group`` groups whose
                                        two best biased scores sum highest
    w_i = c * s_i / (sum_S s)   [T, K]  (``normalize=True``; else w_i = c * s_i;
                                        c = routed_scaling_factor)

The estimators' ``route(x, z, scores, selection)`` receive it; an estimator that selects
deterministically calls :meth:`Selection.select_topk` and :meth:`Selection.combine_weights`.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from moegrad._spec import RouterConfig, RouterViews
from moegrad.mlx.ops import topk_indices


class Selection(RouterViews):
    """``config`` (:class:`RouterConfig`) and ``bias`` ([E] fp32 selection-only bias, or None);
    ``num_experts``, ``top_k``: views of the config."""

    def __init__(self, config: RouterConfig, bias: Optional[mx.array] = None) -> None:
        self.config = config
        self.bias = bias

    def select_topk(self, scores: mx.array) -> mx.array:
        """[T, E] scores -> [T, K] uint32 indices (descending biased score, no gradient)."""
        c = self.config
        choice = mx.stop_gradient(scores)
        if self.bias is not None:
            choice = choice + self.bias
        if c.grouped and choice.shape[0]:
            t = choice.shape[0]
            per_group = c.num_experts // c.n_group
            grouped = choice.reshape(t, c.n_group, per_group)
            best = mx.topk(grouped, min(2, per_group), axis=-1).sum(-1)  # [T, n_group]
            keep_groups = topk_indices(best, c.topk_group)  # [T, topk_group]
            keep = (keep_groups[..., None] == mx.arange(c.n_group)).any(-2)  # [T, n_group]
            choice = mx.where(keep[..., None], grouped, -mx.inf).reshape(t, c.num_experts)
        return topk_indices(choice, c.top_k)

    def combine_weights(self, scores: mx.array, indices: mx.array) -> mx.array:
        """[T, E] scores, [T, K] indices -> [T, K] weights w = c * s_S (/ sum s_S if normalize)."""
        w = mx.take_along_axis(scores, indices, axis=-1)
        if self.config.normalize:
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
        if self.config.routed_scaling_factor != 1.0:
            w = w * self.config.routed_scaling_factor
        return w
