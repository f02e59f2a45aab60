"""The MLX MoE layer (the twin of :class:`moegrad.MoE`) and its forward sequence.

Shapes: T tokens, D model dim, H hidden dim, E experts, K top-k, M kept (token, slot) rows.

    routing = router(x)                                    Routing: indices [T, K], weights [T, K]
    y = run_experts(flat, routing, experts, estimator)     dispatch -> experts -> observe
                                                           -> combine -> estimator.mix
    aux_loss, losses = balance_losses(routing, coefficients)

:func:`run_experts` is the one forward sequence after the router: :class:`MoE` calls it with
its own :class:`~moegrad.mlx.experts.Experts`, and a patched mlx-lm block
(:class:`moegrad.mlx.lm.MoEBlock`) with the block's SwitchGLU seen as experts. The balance
losses are the caller's (:func:`moegrad.mlx.losses.balance_losses`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from moegrad._spec import (LayerViews, check_capacity_factor, check_losses, default_losses, expert_capacity,
                           resolve_estimator, router_capacity_factor)
from moegrad.mlx.dispatch import DispatchPlan, combine_rows, plan_dispatch
from moegrad.mlx.experts import Experts
from moegrad.mlx.losses import balance_losses
from moegrad.mlx.remoe import remoe_penalty
from moegrad.mlx.routing import Router, Routing, flatten_tokens


@dataclass
class MoEStats:
    """tokens_per_expert [E] int64: (token, slot) pairs assigned per expert; dropped: 0-d int64;
    skipped_observations: ``default_moe`` only (else None), [E] int64 running count of
    observations left out of its EMA for not being finite (the estimator's ``skipped``);
    unrouted_tokens: ``routing="expert_choice"`` or ``"remoe"`` only (else None), 0-d int64
    real tokens no expert chose (``tokens_per_expert`` is then c per expert, ``dropped`` 0; as in PyTorch)."""

    tokens_per_expert: mx.array
    dropped: mx.array
    skipped_observations: Optional[mx.array] = None
    unrouted_tokens: Optional[mx.array] = None


@dataclass
class MoEOutput:
    """y: same shape and dtype as the input; aux_loss: scalar fp32 weighted sum of the balance
    losses; routing: :class:`Routing`; stats: :class:`MoEStats`; losses: each loss by name
    (``"remoe_l1"`` too with ``routing="remoe"``, :mod:`moegrad.mlx.remoe`)."""

    y: mx.array
    aux_loss: mx.array
    routing: Routing
    stats: MoEStats
    losses: dict = field(default_factory=dict)


def run_experts(flat: mx.array, routing: Routing, experts, estimator, *, training: bool,
                capacity_factor: Optional[float] = None) -> tuple[mx.array, DispatchPlan]:
    """flat [T, D] tokens and their :class:`Routing` -> (y [T, D], the :class:`DispatchPlan`).

    1. dispatch: (token, slot) pairs sorted by expert (:func:`plan_dispatch`); padding tokens
       (``routing.mask`` False) are left out; with ``capacity_factor`` each expert keeps its
       ceil(c * T_real * K / E) pairs of highest weight (padding takes no capacity);
    2. experts: ``experts(rows [M, D], expert ids [M]) -> [M, D]``;
    3. observe (training only, estimators with ``observes_outputs``): per-expert sums [E, D]
       fp32 of the outputs (no gradient) and the rows per expert [E];
    4. combine: y[t] = sum_k w[t, k] out[t, k], dropped pairs giving 0;
    5. ``estimator.mix(y, flat, routing, experts)``: the estimator's terms (``dense``,
       ``default_moe``), with ``experts`` read through its ``stacked_weights`` / ``every_expert``.
    """
    num_tokens, dim = flat.shape
    num_experts = routing.logits.shape[1]
    capacity = None
    keep = routing.mask
    if routing.chosen is not None:  # expert choice / ReMoE: the router's choice is the capacity
        keep, capacity_factor = routing.chosen, None
    if capacity_factor is not None:  # sized by the real tokens: padding takes no capacity
        real = num_tokens if routing.mask is None else int(routing.mask.sum())
        capacity = expert_capacity(capacity_factor, real, routing.indices.shape[1], num_experts)
    plan = plan_dispatch(routing.indices, routing.weights, num_experts, capacity, keep=keep)
    rows = experts(flat[plan.tokens], plan.experts)  # [M, D]
    if training and estimator.observes_outputs and rows.shape[0]:
        sums = mx.zeros((num_experts, dim), dtype=mx.float32)
        sums = sums.at[plan.experts].add(mx.stop_gradient(rows).astype(mx.float32))
        estimator.observe(sums, plan.counts)
    y = combine_rows(rows, routing.weights, plan, num_tokens)
    return estimator.mix(y, flat, routing, experts), plan


class MoE(LayerViews, nn.Module):
    """A sparse Mixture-of-Experts feed-forward layer in MLX (arguments as :class:`moegrad.MoE`,
    without ``impl``: the experts always run through ``mx.gather_mm`` on expert-sorted rows).

    ``__call__(x [T, D] or [B, S, D], mask=None) -> MoEOutput``; as in PyTorch, padding tokens
    (``mask`` False) are not sent to any expert, take no capacity and are left out of the losses,
    load counts and ``stats``.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, *,
                 routing: str = "topk", estimator: Optional[str] = None, score: Optional[str] = None,
                 normalize: bool = False,
                 activation: str = "swiglu", losses: Optional[dict] = None,
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
        self.experts = Experts(dim, hidden_dim, num_experts, activation)
        # a tuple of pairs, not a dict: MLX modules would treat a dict attribute as a subtree
        self._losses = tuple(check_losses(default_losses(routing) if losses is None else losses,
                                          resolve_estimator(estimator, routing), routing).items())
        self.capacity_factor = check_capacity_factor(capacity_factor)

    @property
    def losses(self) -> dict:
        return dict(self._losses)

    def _extra_repr(self) -> str:
        return self.config_repr()

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None) -> MoEOutput:
        flat = flatten_tokens(x, self.dim)
        routing = self.router(x, mask)
        estimator = self.router.estimator
        y, plan = run_experts(flat, routing, self.experts, estimator, training=self.training,
                              capacity_factor=self.capacity_factor)
        aux_loss, values = balance_losses(routing, self.losses)
        if self.router.config.routing == "remoe":
            penalty, values["remoe_l1"] = remoe_penalty(self.router, routing, self.training)
            aux_loss = aux_loss + penalty
        unrouted = None
        if routing.chosen is not None:
            none = ~routing.chosen.any(1)
            unrouted = (none if routing.mask is None else none & routing.mask).astype(mx.int64).sum()
        stats = MoEStats(tokens_per_expert=plan.routed, dropped=plan.dropped,
                         skipped_observations=getattr(estimator, "skipped", None),
                         unrouted_tokens=unrouted)
        return MoEOutput(y.reshape(x.shape).astype(x.dtype), aux_loss, routing, stats, values)
