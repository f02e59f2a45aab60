"""Dispatch (token, slot) pairs to experts and combine the results.

Shapes: T tokens, K top-k, E experts, N = T*K pairs, M <= N kept pairs, D model dim.
Pair p = t*K + j is token t's j-th choice. Pairs are ordered by expert with one stable sort,
so the row order (and every result) is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class DispatchPlan:
    """pairs [M] kept pair ids sorted by expert; tokens [M] their token ids; experts [M] their
    expert ids; counts [E] kept rows per expert; routed [E] pairs the router assigned per expert
    (before capacity); dropped: 0-d int64, pairs over capacity (routed.sum() - counts.sum())."""

    pairs: Tensor
    tokens: Tensor
    experts: Tensor
    counts: Tensor
    routed: Tensor
    dropped: Tensor


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """ceil(capacity_factor * T * K / E)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def plan_dispatch(indices: Tensor, weights: Tensor, num_experts: int,
                  capacity: Optional[int] = None) -> DispatchPlan:
    """indices [T, K] int64, weights [T, K] -> :class:`DispatchPlan`.

    With ``capacity``, each expert keeps its ``capacity`` pairs of highest weight (ties: the
    earlier pair) and the rest are dropped and counted.
    """
    top_k = indices.shape[1]
    flat = indices.reshape(-1)
    routed = torch.bincount(flat, minlength=num_experts)
    if capacity is None:
        pairs = torch.argsort(flat, stable=True)
        counts = routed
    else:
        by_weight = torch.argsort(weights.detach().reshape(-1), descending=True, stable=True)
        pairs = by_weight[torch.argsort(flat[by_weight], stable=True)]
        starts = torch.cumsum(routed, 0) - routed
        rank = torch.arange(flat.numel(), device=flat.device) - starts[flat[pairs]]
        pairs = pairs[rank < capacity]
        counts = routed.clamp(max=capacity)
    dropped = routed.sum() - counts.sum()
    return DispatchPlan(pairs, torch.div(pairs, top_k, rounding_mode="floor"), flat[pairs], counts,
                        routed, dropped)


def combine_rows(rows: Tensor, weights: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """y[t] = sum_j w[t, j] * out[t, j]: rows [M, D] expert outputs, weights [T, K] -> [T, D].

    Dropped pairs contribute zero. The weighted rows are placed back at their pair slots and
    summed over K (no atomics), so the result is deterministic.
    """
    top_k = weights.shape[1]
    w = weights.reshape(-1)[plan.pairs].to(rows.dtype)
    slots = rows.new_zeros(num_tokens * top_k, rows.shape[1])
    slots = slots.index_copy(0, plan.pairs, rows * w[:, None])
    return slots.view(num_tokens, top_k, rows.shape[1]).sum(1)
