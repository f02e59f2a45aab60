"""The shared selection and weighting rules an estimator routes with.

Shapes: T tokens, E experts, K top-k, G = ``n_group`` expert groups of E / G experts.

    choice = s + b                       [T, E]  b: the optional selection-only bias
    choice = Sinkhorn(s)                 [T, E]  instead, with ``routing="sinkhorn"`` in
                                         training mode (:func:`sinkhorn`; eval: choice = s)
    group-limited top-k (DeepSeek-V3):   keep the ``topk_group`` groups whose two best choices
                                         sum highest, the other experts get -inf
    S = TopK(choice)                     [T, K]  (:meth:`Selection.select_topk`, no gradient)
    w_i = c * s_i (/ sum_S s + 1e-20)    [T, K]  c = routed_scaling_factor, the division with
                                         ``normalize=True`` (:meth:`Selection.combine_weights`)

The router (:class:`moegrad.Router`, and the HF adapter's router) builds one :class:`Selection`
per call from its configuration and its bias buffer and hands it to the estimator's
``route(x, z, scores, selection)``: the estimator gets these rules, not the router module.
A :class:`Selection` also has the router's ``config``, ``bias``, ``num_experts`` and ``top_k``,
so a user estimator written when ``route`` received the router keeps working if it reads only
those and ``select_topk`` / ``combine_weights``; other router attributes (``gate``,
``training``, ``load_counts``) are not passed any more (AttributeError naming ``Selection``);
``selection.training`` is the router's mode (it decides whether ``routing="sinkhorn"`` balances).

Sinkhorn selection (``routing="sinkhorn"``, Megatron-Core's ``sinkhorn`` load-balancing type,
megatron/core/transformer/moe/router.py ``sinkhorn_load_balancing`` and moe_utils.py
``sinkhorn``; Clark et al. 2022, "Unified Scaling Laws for Routed Language Models"): in
training mode S = TopK(P) with P the Sinkhorn balancing of the scores, in eval mode
S = TopK(s) as for ``topk``; the combine weights are the router's own scores at S either way,
so every estimator that selects with :meth:`Selection.select_topk` keeps its gradient path.
Where moegrad differs from Megatron-Core (besides :func:`sinkhorn`'s own notes): Megatron
weighs with sigmoid(logits) for K = 1 and softmax(logits) for K > 1 whatever its score
function, moegrad with the router's rule (score, ``normalize``, ``routed_scaling_factor``) and
balances the tempered scores; Megatron refuses an aux loss with Sinkhorn, moegrad allows the
balance losses (redundant, not wrong). As in Megatron the balance is over the tokens of one
call on one rank: padding tokens take part (the mask is not passed to the selection) and
expert-parallel ranks balance their own tokens.

Expert-choice selection (``routing="expert_choice"``; Zhou et al. 2022, "Mixture-of-Experts
with Expert Choice Routing", arXiv 2202.09368): the experts choose the tokens,

    c = min(ceil(f * T * K / E), T)      tokens per expert (f = capacity_factor, 1 if None;
                                         T the real tokens, :func:`moegrad._spec.expert_choice_capacity`)
    C[:, e] = TopC(s[:, e])              [T, E] bool, each column has exactly c True
                                         (:meth:`Selection.select_expert_choice`, no gradient)
    w = r * s * C                        [T, E]  r = routed_scaling_factor; no renormalisation

so y_t = sum_{e: C[t, e]} r s_te E_e(x_t): a token gets zero, one or several experts. The router
gradient is plain autograd through the gathered scores (as ``topk``). Padding tokens are never
chosen and do not count in T. Training and eval select the same way.
Causality caveat: a token's experts depend on the other tokens of the call, future ones
included, so an autoregressive LM trained this way cannot generate token by token with the same
routing (the paper's caveat; a fix is a per-sequence or causal variant, not provided here).
(ReMoE, ``routing="remoe"``, is causal: a token's experts are its own positive ReLU gates,
:func:`remoe_active`; its penalty is :mod:`moegrad.remoe`.)
Differences from the paper: it takes softmax scores; moegrad the router's score function
(softmax or sigmoid, with temperature); the paper's optional per-token cap on experts
(its entropy-regularised LP variant) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from moegrad._spec import (SINKHORN_EPS, SINKHORN_MAX_ITERS, SINKHORN_TOL, RouterConfig,
                           RouterViews, expert_choice_capacity)

__all__ = ["Selection", "sinkhorn", "remoe_active"]


@torch.no_grad()
def remoe_active(gates: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """ReMoE's selection (``routing="remoe"``): [T, E] ReLU gates, [T] real-token mask or None
    -> [T, E] bool, True where the gate is positive on a real token (its experts)."""
    active = gates > 0
    return active if mask is None else active & mask[:, None]


@torch.no_grad()
def sinkhorn(cost: Tensor, tol: float = SINKHORN_TOL, max_iters: int = SINKHORN_MAX_ITERS,
             eps: float = SINKHORN_EPS, mask: Optional[Tensor] = None) -> Tensor:
    """Sinkhorn-Knopp balancing of a positive [T, E] matrix C -> P = diag(d0) C diag(d1) [T, E].

    Alternates, starting from d1 = 1:

        d0 = (1/T) / (C d1 + eps)        rows of P sum to 1/T
        d1 = (1/E) / (C^T d0 + eps)      columns of P sum to 1/E (exactly, after this step)

    until mean |d1 - d1_previous| <= ``tol`` or ``max_iters`` iterations. ``mask`` [T] bool
    (True = real token): padding rows carry no mass (d0 = 0, T counts the real tokens only), so
    P of the real rows equals the balancing of the real rows alone and padding pulls no expert's
    column down; the padding rows of P are 0. P is then (to the
    tolerance) a transport plan with uniform marginals: every token has mass 1/T and every
    expert receives 1/E, so T * P has rows summing to 1 and columns to T/E. Row-wise top-k of
    P is invariant to P's overall scale, hence to these normalisation constants.

    Same iteration, scaling, starting point, stopping rule and eps as Megatron-Core's
    ``moe_utils.sinkhorn``; differences: Megatron takes C = exp(logits), moegrad the router's
    scores (identical P for ``score="softmax"``, whose row normalisation the first d0 step
    absorbs; for ``score="sigmoid"`` P is the balancing of sigmoid(z), not of exp(z), and
    cannot overflow); Megatron loops without a cap, moegrad stops after ``max_iters``. Runs
    without gradient (the selection is a constant) and eagerly under torch.compile, as an
    opaque custom op (the tolerance test reads a value on the host each iteration, as
    Megatron's does), so without a graph break.
    """
    if torch.compiler.is_compiling():
        return torch.ops.moegrad.sinkhorn(cost.detach(), tol, max_iters, eps, mask)
    return _sinkhorn(cost, tol, max_iters, eps, mask)


@torch.library.custom_op("moegrad::sinkhorn", mutates_args=())
def _sinkhorn_op(cost: Tensor, tol: float, max_iters: int, eps: float, mask: Optional[Tensor]) -> Tensor:
    return _sinkhorn(cost, tol, max_iters, eps, mask)


@_sinkhorn_op.register_fake
def _(cost, tol, max_iters, eps, mask):
    return torch.empty_like(cost)


def _sinkhorn(cost: Tensor, tol: float, max_iters: int, eps: float, mask: Optional[Tensor]) -> Tensor:
    t, e = cost.shape
    rows = None if mask is None else mask.to(cost.dtype)
    real = t if mask is None else int(mask.sum())
    if real == 0:
        return torch.zeros_like(cost)
    d1 = torch.ones(e, dtype=cost.dtype, device=cost.device)
    for _ in range(max_iters):
        d0 = (1.0 / real) / ((d1 * cost).sum(1) + eps)  # [T]
        if rows is not None:
            d0 = d0 * rows
        new = (1.0 / e) / ((d0[:, None] * cost).sum(0) + eps)  # [E]
        error = (new - d1).abs().mean()
        d1 = new
        if bool(error <= tol):
            break
    return d0[:, None] * cost * d1


def _factor(capacity_factor: Optional[float]) -> float:
    return 1.0 if capacity_factor is None else capacity_factor


@dataclass(frozen=True, eq=False)
class Selection(RouterViews):
    """``config``: the router's :class:`~moegrad.routing.RouterConfig`; ``bias``: [E] fp32
    selection-only bias (auxiliary-loss-free balancing; it changes S, never the weights) or None;
    ``training``: the router's mode (``routing="sinkhorn"`` balances in training mode only);
    ``mask``: [T] bool of the call's real tokens or None (Sinkhorn balances the real ones)."""

    config: RouterConfig
    bias: Optional[Tensor] = None
    training: bool = False
    mask: Optional[Tensor] = None

    def select_topk(self, scores: Tensor) -> Tensor:
        """Deterministic selection: [T, E] scores -> [T, K] int64 indices (descending score).

        With ``routing="sinkhorn"`` in training mode the scores are first balanced by
        :func:`sinkhorn`; adds the selection-only bias, applies group-limited top-k (on the
        balanced matrix for Sinkhorn), then takes the top-k.
        """
        with torch.no_grad():  # a context, not a decorator: torch.compile traces it without a break
            return self._select_topk(scores)

    def _select_topk(self, scores: Tensor) -> Tensor:
        c = self.config
        choice = scores
        if c.routing == "sinkhorn" and self.training:
            choice = sinkhorn(scores, mask=self.mask)
        if self.bias is not None:
            choice = choice + self.bias
        if c.grouped and choice.shape[0]:
            t = choice.shape[0]
            per_group = c.num_experts // c.n_group
            grouped = choice.view(t, c.n_group, per_group)
            best = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)  # [T, n_group]
            keep_groups = best.topk(c.topk_group, dim=-1).indices
            keep = torch.zeros(t, c.n_group, dtype=torch.bool, device=choice.device)
            keep.scatter_(1, keep_groups, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(t, c.num_experts)
        return choice.topk(c.top_k, dim=-1).indices

    def select_expert_choice(self, scores: Tensor, capacity: Optional[int] = None) -> Tensor:
        """Expert choice: [T, E] scores (real tokens: the Selection's ``mask``) -> [T, E]
        bool C with C[t, e] True iff expert e takes token t: each expert takes its
        c = ``capacity`` (by default :func:`~moegrad._spec.expert_choice_capacity` of the
        real tokens) highest-scoring real tokens (ties: the earlier token)."""
        with torch.no_grad():  # a context, not a decorator: torch.compile traces it without a break
            return self._select_expert_choice(scores, capacity)

    def _select_expert_choice(self, scores: Tensor, capacity: Optional[int]) -> Tensor:
        c, mask = self.config, self.mask
        if capacity is None and mask is not None and torch.compiler.is_compiling():
            # c depends on the real-token count: no host read, the same c as a 0-d tensor and
            # the same choice as a static-shape rank test (expert_choice_capacity in float64)
            t = scores.shape[0]
            real = mask.sum().double()
            cap = torch.minimum(torch.ceil(_factor(c.capacity_factor) * real * c.top_k / c.num_experts),
                                real).long()
            choice = scores.masked_fill(~mask[:, None], float("-inf"))
            order = torch.argsort(choice, dim=0, descending=True, stable=True)  # [T, E]
            rank = torch.arange(t, device=scores.device)[:, None].expand_as(order)
            return torch.zeros_like(order, dtype=torch.bool).scatter_(0, order, rank < cap)
        t, e = scores.shape
        real = t if mask is None else int(mask.sum())
        if capacity is None:
            capacity = expert_choice_capacity(c.capacity_factor, real, c.top_k, c.num_experts)
        chosen = torch.zeros(t, e, dtype=torch.bool, device=scores.device)
        if capacity == 0:
            return chosen
        choice = scores if mask is None else scores.masked_fill(~mask[:, None], float("-inf"))
        # stable descending sort so ties go to the earlier token, as in plan_dispatch
        top = torch.argsort(choice, dim=0, descending=True, stable=True)[:capacity]  # [c, E]
        chosen.scatter_(0, top, True)
        return chosen

    def combine_weights(self, scores: Tensor, indices: Tensor) -> Tensor:
        """[T, E] scores, [T, K] indices -> [T, K] weights w = c * s_S (/ sum s_S if normalize)."""
        w = scores.gather(1, indices)
        if self.config.normalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        if self.config.routed_scaling_factor != 1.0:
            w = w * self.config.routed_scaling_factor
        return w
