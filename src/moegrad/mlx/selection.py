"""The deterministic top-k selection and its combine weights, in MLX (the twin of
:mod:`moegrad.selection`).

Shapes: T tokens, E experts, K top-k. A :class:`Selection` is built by the router for each call
from its :class:`~moegrad._spec.RouterConfig` and its optional selection-only bias b [E]:

    P = Sinkhorn(s)             [T, E]  with ``routing="sinkhorn"`` in training mode
                                        (:func:`sinkhorn`), then S = TopK(P) (eval: TopK(s))
    S = TopK(s + b)             [T, K]  group-limited top-k (DeepSeek-V3) may first mask whole
                                        groups of experts: keep the ``topk_group`` groups whose
                                        two best biased scores sum highest
    w_i = c * s_i / (sum_S s)   [T, K]  (``normalize=True``; else w_i = c * s_i;
                                        c = routed_scaling_factor)

Expert choice (``routing="expert_choice"``, :meth:`Selection.select_expert_choice`): every
expert takes its c = min(ceil(f T K / E), T) highest-scoring real tokens, as in
:mod:`moegrad.selection` (the rule, the caveats and the differences from the paper are there).

The estimators' ``route(x, z, scores, selection)`` receive it; an estimator that selects
deterministically calls :meth:`Selection.select_topk` and :meth:`Selection.combine_weights`.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from moegrad._spec import (SINKHORN_EPS, SINKHORN_MAX_ITERS, SINKHORN_TOL, RouterConfig,
                           RouterViews, expert_choice_capacity)
from moegrad.mlx.ops import topk_indices


def remoe_active(gates: mx.array, mask: Optional[mx.array] = None) -> mx.array:
    """ReMoE's selection (``routing="remoe"``, :func:`moegrad.selection.remoe_active`): [T, E]
    ReLU gates, [T] real-token mask or None -> [T, E] bool, positive gates of real tokens."""
    active = mx.stop_gradient(gates) > 0
    return active if mask is None else active & mask[:, None]


def sinkhorn(cost: mx.array, tol: float = SINKHORN_TOL, max_iters: int = SINKHORN_MAX_ITERS,
             eps: float = SINKHORN_EPS, mask: Optional[mx.array] = None) -> mx.array:
    """Sinkhorn-Knopp balancing of a positive [T, E] matrix C -> P = diag(d0) C diag(d1) [T, E]
    (no gradient): from d1 = 1, d0 = (1/T) / (C d1 + eps), d1 = (1/E) / (C^T d0 + eps) until
    mean |d1 - d1_previous| <= ``tol`` or ``max_iters`` iterations; rows of P sum to 1/T (to
    the tolerance), columns to 1/E. The same maths, constants and differences from
    Megatron-Core as :func:`moegrad.selection.sinkhorn`, including ``mask`` [T] bool: padding
    rows carry no mass (the tolerance test evaluates the graph
    each iteration, so this does not run under ``mx.compile``)."""
    cost = mx.stop_gradient(cost)
    t, e = cost.shape
    rows = None if mask is None else mask.astype(cost.dtype)
    real = t if mask is None else int(mask.sum())
    if real == 0:
        return mx.zeros_like(cost)
    d1 = mx.ones((e,), dtype=cost.dtype)
    for _ in range(max_iters):
        d0 = (1.0 / real) / ((d1 * cost).sum(1) + eps)  # [T]
        if rows is not None:
            d0 = d0 * rows
        new = (1.0 / e) / ((d0[:, None] * cost).sum(0) + eps)  # [E]
        error = mx.abs(new - d1).mean()
        d1 = new
        if float(error) <= tol:
            break
    return d0[:, None] * cost * d1


class Selection(RouterViews):
    """``config`` (:class:`RouterConfig`), ``bias`` ([E] fp32 selection-only bias, or None) and
    ``training`` (the router's mode: ``routing="sinkhorn"`` balances in training mode only);
    ``mask`` ([T] bool of the call's real tokens, or None: Sinkhorn balances the real ones);
    ``num_experts``, ``top_k``: views of the config."""

    def __init__(self, config: RouterConfig, bias: Optional[mx.array] = None,
                 training: bool = False, mask: Optional[mx.array] = None) -> None:
        self.config = config
        self.bias = bias
        self.training = training
        self.mask = mask

    def select_topk(self, scores: mx.array) -> mx.array:
        """[T, E] scores -> [T, K] uint32 indices (descending biased score, no gradient); with
        ``routing="sinkhorn"`` in training mode the top-k of :func:`sinkhorn` of the scores."""
        c = self.config
        choice = mx.stop_gradient(scores)
        if c.routing == "sinkhorn" and self.training:
            choice = sinkhorn(choice, mask=self.mask)
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

    def select_expert_choice(self, scores: mx.array, capacity: Optional[int] = None) -> mx.array:
        """Expert choice: [T, E] scores (real tokens: the Selection's ``mask``) -> [T, E] bool, True
        where expert e takes token t: each expert its c highest-scoring real tokens (ties: the
        earlier token; c by default :func:`~moegrad._spec.expert_choice_capacity` of the real
        tokens). No gradient."""
        c, mask = self.config, self.mask
        t, e = scores.shape
        real = t if mask is None else int(mask.sum())
        if capacity is None:
            capacity = expert_choice_capacity(c.capacity_factor, real, c.top_k, c.num_experts)
        choice = mx.stop_gradient(scores)
        if mask is not None:
            choice = mx.where(mask[:, None], choice, -mx.inf)
        if capacity == 0 or t == 0:
            return mx.zeros((t, e), dtype=mx.bool_)
        order = mx.argsort(-choice, axis=0)  # [T, E] tokens by descending score per expert
        rank = mx.argsort(order, axis=0)  # [T, E] each token's place in its expert's order
        return rank < capacity

    def combine_weights(self, scores: mx.array, indices: mx.array) -> mx.array:
        """[T, E] scores, [T, K] indices -> [T, K] weights w = c * s_S (/ sum s_S if normalize)."""
        w = mx.take_along_axis(scores, indices, axis=-1)
        if self.config.normalize:
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
        if self.config.routed_scaling_factor != 1.0:
            w = w * self.config.routed_scaling_factor
        return w
