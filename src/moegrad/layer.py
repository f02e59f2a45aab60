"""The MoE layer: router -> dispatch -> experts -> combine (-> estimator hook) -> balance losses.

Shapes: T tokens, D model dim, H hidden dim, E experts, K top-k, M kept (token, slot) rows.

:func:`run_experts` is the one forward sequence after routing, shared by :class:`MoE` and the
HF adapter (:mod:`moegrad.hf`)::

    plan  = plan_dispatch(indices, weights, E, capacity, keep=mask)  (token, slot) pairs by expert
    rows  = experts(gather_rows(x, plan), plan.counts)               [M, D]
    observe: per-expert sums [E, D] and counts [E] of rows           training, estimators that
             (all-reduced over the expert-parallel group)            observe outputs, not in
                                                                     checkpointing's recomputation
    y     = combine_rows(rows, weights, plan, T)                     [T, D]
    y     = estimator.mix(y, x, routing, experts)                    dense / default_moe hooks

The caller then adds the balance losses (:func:`moegrad.losses.balance_losses`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from moegrad._collectives import reduce_observation
from moegrad._spec import (LayerViews, check_capacity_factor, check_losses, default_losses, expert_capacity,
                           expert_choice_capacity, resolve_estimator, router_capacity_factor)
from moegrad.dispatch import DispatchPlan, combine_rows, gather_rows, plan_dispatch
from moegrad.experts import Experts
from moegrad.losses import balance_losses
from moegrad.remoe import remoe_penalty
from moegrad.routing import Router, Routing, flatten_tokens, recomputing_in_backward, unless_recomputing


def run_experts(x: Tensor, routing: Routing, experts: nn.Module, estimator: nn.Module, *,
                training: bool, capacity_factor: Optional[float] = None,
                group=None, max_rows: Optional[int] = None) -> tuple[Tensor, DispatchPlan]:
    """Dispatch -> experts -> observe -> combine -> ``estimator.mix``: x [T, D] -> (y [T, D], plan).

    ``routing``: the router's decision for x (padding tokens, ``routing.mask`` False, are not
    sent to any expert); ``experts``: an experts module (:class:`moegrad._interfaces.ExpertsModule`,
    ``experts(rows [M, D], counts [E]) -> [M, D]``); ``estimator``: the router's estimator;
    ``training``: the layer's mode (the estimator observes expert outputs in training only);
    ``capacity_factor``: each expert keeps its ceil(c * T_real * K / E) highest-weight pairs,
    T_real the real tokens (padding takes no capacity); None: dropless (expert choice and
    ReMoE, ``routing.chosen`` set, dispatch exactly the chosen pairs and ignore it);
    ``max_rows``: an upper bound on the dispatched pairs, or None (the static-shape plan under
    torch.compile then holds at most that many rows; expert choice: E * c);
    ``group``: the expert-parallel process group, or None. With a group every rank reduces its
    observation, even without rows, so the ranks run the same collectives. The returned
    :class:`~moegrad.dispatch.DispatchPlan` holds the load counts (``routed``, ``dropped``).
    """
    num_tokens, num_experts = x.shape[0], routing.logits.shape[1]
    capacity = None
    keep = routing.mask
    if routing.chosen is not None:  # expert choice / ReMoE: the router's choice is the capacity
        keep, capacity_factor = routing.chosen, None
    top_k = routing.indices.shape[1]
    # under torch.compile a static-shape plan (no data-dependent size, no graph break): R rows,
    # the kept ones first, padding rows that moegrad's Experts skip (plan_dispatch's padded)
    # (moegrad's own Experts.forward only: a subclass's forward(rows, counts) takes no padded=)
    padded = (torch.compiler.is_compiling() and isinstance(experts, Experts)
              and type(experts).forward is Experts.forward
              and (keep is not None or capacity_factor is not None))
    if capacity_factor is not None:
        if routing.mask is None or not padded:
            real = num_tokens if routing.mask is None else int(routing.mask.sum())
            capacity = expert_capacity(capacity_factor, real, top_k, num_experts)
        else:  # the same ceil(c * T_real * K / E) as expert_capacity, in float64 on the device
            real = routing.mask.sum().double()
            capacity = torch.ceil(capacity_factor * real * top_k / num_experts).long()
        max_rows = num_experts * expert_capacity(capacity_factor, num_tokens, top_k, num_experts)
    plan = plan_dispatch(routing.indices, routing.weights, num_experts, capacity, keep=keep,
                         padded=padded, max_rows=max_rows)
    rows = gather_rows(x, plan)
    rows = experts(rows, plan.counts, padded=True) if padded else experts(rows, plan.counts)  # [M or R, D]
    observe = training and estimator.observes_outputs
    if observe and (rows.shape[0] or group is not None):
        sums = rows.new_zeros(num_experts, x.shape[1], dtype=torch.float32)
        sums.index_add_(0, plan.experts, rows.detach().float())
        _observe(estimator, sums, plan.counts, group)
    y = combine_rows(rows, routing.weights, plan, num_tokens)
    return estimator.mix(y, x, routing, experts), plan


def _observe(estimator: nn.Module, sums: Tensor, counts: Tensor, group) -> None:
    """estimator.observe(sums [E, D], counts [E]) (all-reduced over ``group``), not in
    checkpointing's recomputation. Under torch.compile (no group) it is traced, and the
    recomputation test runs at run time: a recomputation observes zero sums and counts, which
    changes nothing (``default_moe`` updates only experts with counts > 0)."""
    if group is not None:
        _observe_over_group(estimator, sums, counts, group)
    elif torch.compiler.is_compiling():
        keep = unless_recomputing(torch.ones((), device=counts.device), 0.0)  # 0-d: 1, or 0 in a rerun
        estimator.observe(sums * keep, counts * keep.long())
    elif not recomputing_in_backward():
        estimator.observe(sums, counts)


@torch.compiler.disable
def _observe_over_group(estimator: nn.Module, sums: Tensor, counts: Tensor, group) -> None:
    """:func:`_observe` over an expert-parallel group: every rank's statistics, so the buffers
    stay identical (eager under torch.compile: the all-reduce is a graph break)."""
    if recomputing_in_backward():
        return
    sums, counts = reduce_observation(sums, counts, group)
    estimator.observe(sums, counts)


@dataclass
class MoEStats:
    """tokens_per_expert [E] int64: (token, slot) pairs the router assigned to each expert;
    dropped: 0-d int64, pairs dropped by capacity (0 when dropless); skipped_observations:
    ``default_moe`` only (else None), [E] int64 running count of expert-output observations
    left out of its EMA for not being finite (a copy of the estimator's ``skipped``);
    unrouted_tokens: ``routing="expert_choice"`` or ``"remoe"`` only (else None), 0-d int64,
    real tokens no expert chose (their sparse output is 0). Under expert choice ``tokens_per_expert`` is the
    tokens each expert chose, exactly c per expert, and ``dropped`` is 0 (nothing is dropped
    after the choice: tokens beyond an expert's top-c were never routed to it)."""

    tokens_per_expert: Tensor
    dropped: Tensor
    skipped_observations: Optional[Tensor] = None
    unrouted_tokens: Optional[Tensor] = None


@dataclass
class MoEOutput:
    """y: same shape and dtype as the input; aux_loss: scalar fp32, the weighted sum of the
    configured balance losses; routing: the :class:`Routing`; stats: :class:`MoEStats`;
    losses: each configured balance loss, unweighted, by name (with ``routing="remoe"`` also
    ``"remoe_l1"``, the L1 penalty before its adaptive coefficient, :mod:`moegrad.remoe`)."""

    y: Tensor
    aux_loss: Tensor
    routing: Routing
    stats: MoEStats
    losses: dict = field(default_factory=dict)


class MoE(LayerViews, nn.Module):
    """A sparse Mixture-of-Experts feed-forward layer.

    Args:
        dim, hidden_dim, num_experts, top_k: D, H, E, K.
        estimator: the router gradient estimator (:func:`moegrad.estimators.available`);
            extra keyword arguments are its options.
        routing, score, normalize, temperature, routed_scaling_factor, n_group, topk_group,
            selection_bias, check_finite, l1_init, l1_alpha: see :class:`moegrad.Router`.
        activation: "swiglu" (default) or "gelu".
        impl: grouped expert compute backend (:data:`moegrad.experts.IMPLS`), "auto" by default.
        losses: ``{name: coefficient}`` balance losses (:mod:`moegrad.losses`); default
            ``{"switch": 1e-2}``, ``{}`` for none. With ``routing="expert_choice"`` the default
            is ``{}`` and only ``z_loss`` is taken (balanced by construction); the same with
            ``routing="remoe"``, whose aux_loss always holds its adaptive L1 penalty.
        capacity_factor: None (dropless, default) or c > 0: each expert keeps its
            ceil(c * T * K / E) highest-weight pairs; the rest contribute zero and are counted.
            With ``routing="expert_choice"`` it is the router's f: each expert takes
            min(ceil(f * T * K / E), T) tokens (f = 1 when None), see :class:`moegrad.Router`.
            ``routing="remoe"`` is dropless (None only).

    ``forward(x [T, D] or [B, S, D], mask=None) -> MoEOutput``; ``mask`` (bool, x's leading
    shape, True = real token) keeps padding out of everything: padding tokens are not sent to
    any expert (their sparse output is 0), take no capacity, and are left out of the balance
    losses, the load counts and ``stats``.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, *,
                 routing: str = "topk", estimator: Optional[str] = None, score: Optional[str] = None,
                 normalize: bool = False,
                 activation: str = "swiglu", impl: str = "auto", losses: Optional[dict] = None,
                 capacity_factor: Optional[float] = None, temperature: float = 1.0,
                 routed_scaling_factor: float = 1.0, n_group: Optional[int] = None,
                 topk_group: Optional[int] = None, selection_bias: bool = False,
                 check_finite: bool = True, l1_init: Optional[float] = None,
                 l1_alpha: Optional[float] = None, **estimator_options) -> None:
        super().__init__()
        self.router = Router(dim, num_experts, top_k, routing=routing, score=score,
                             normalize=normalize,
                             estimator=estimator, temperature=temperature,
                             routed_scaling_factor=routed_scaling_factor, n_group=n_group,
                             topk_group=topk_group, selection_bias=selection_bias,
                             check_finite=check_finite,
                             capacity_factor=router_capacity_factor(routing, capacity_factor),
                             l1_init=l1_init, l1_alpha=l1_alpha, **estimator_options)
        self.experts = Experts(dim, hidden_dim, num_experts, activation, impl)
        self.losses = check_losses(default_losses(routing) if losses is None else losses,
                                   resolve_estimator(estimator, routing), routing)
        self.capacity_factor = check_capacity_factor(capacity_factor)
        #: expert-parallel process group (set by moegrad.distributed.expert_parallel), else None
        self.process_group = None
        #: int64 [E + 1] switch-loss counts of a gradient-accumulation window, filled in by
        #: moegrad.balancing.BalanceWindow (non-persistent); None without a window
        self.register_buffer("balance_window", None, persistent=False)

    # dim, num_experts, top_k, estimator: read-only views of the router (LayerViews)
    def extra_repr(self) -> str:
        return self.config_repr()

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> MoEOutput:
        flat = flatten_tokens(x, self.dim)
        weight_dtype = self.experts.stacked_weights().gate.dtype
        if flat.dtype != weight_dtype and not torch.is_autocast_enabled(flat.device.type):
            raise TypeError(
                f"x has dtype {flat.dtype} but the layer's expert weights have {weight_dtype}; "
                f"cast the input (x.to({weight_dtype})) or the layer (moe.to({flat.dtype})), or "
                "run under torch.autocast")
        routing = self.router(x, mask)
        group = self.process_group  # set by moegrad.distributed.expert_parallel
        estimator = self.router.estimator
        max_rows = None
        if self.router.config.routing == "expert_choice":  # each expert takes at most c(T) tokens
            max_rows = self.num_experts * expert_choice_capacity(self.capacity_factor, flat.shape[0],
                                                                 self.top_k, self.num_experts)
        y, plan = run_experts(flat, routing, self.experts, estimator, training=self.training,
                              capacity_factor=self.capacity_factor, group=group, max_rows=max_rows)
        # BalanceWindow's counts over the micro-batches since its reset (training only)
        window = self.balance_window if self.training else None
        aux_loss, values = balance_losses(routing, self.losses, group, window)
        if self.router.config.routing == "remoe":
            penalty, values["remoe_l1"] = remoe_penalty(self.router, routing, self.training)
            aux_loss = aux_loss + penalty
        skipped = getattr(estimator, "skipped", None)  # default_moe's buffer, if any
        unrouted = None
        if routing.chosen is not None:
            none = ~routing.chosen.any(1)
            unrouted = (none if routing.mask is None else none & routing.mask).sum()
        stats = MoEStats(tokens_per_expert=plan.routed, dropped=plan.dropped,
                         skipped_observations=None if skipped is None else skipped.clone(),
                         unrouted_tokens=unrouted)
        return MoEOutput(y.view(x.shape), aux_loss, routing, stats, values)
