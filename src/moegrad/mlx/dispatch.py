"""Dispatch (token, slot) pairs to experts and combine the results, in MLX.

Shapes: T tokens, K top-k, E experts, N = T*K pairs, M <= N kept pairs, D model dim.
Pair p = t*K + j is token t's j-th choice. As in mlx-lm's ``SwitchGLU``, the pairs are put in
expert order with one (stable) ``argsort`` of the flat expert ids, so each expert's rows are
contiguous and ``mx.gather_mm(..., sorted_indices=True)`` reads each expert's weights once;
the inverse permutation puts the rows back. Same plan as :func:`moegrad.dispatch.plan_dispatch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from moegrad.mlx.ops import counts as histogram


@dataclass
class DispatchPlan:
    """pairs [M] kept pair ids sorted by expert (uint32); tokens [M] their token ids; experts [M]
    their expert ids; counts [E] kept rows per expert; routed [E] pairs assigned per expert
    (before capacity); dropped: 0-d int64; ``dropless``: every pair kept (pairs a permutation)."""

    pairs: mx.array
    tokens: mx.array
    experts: mx.array
    counts: mx.array
    routed: mx.array
    dropped: mx.array
    dropless: bool


def plan_dispatch(indices: mx.array, weights: mx.array, num_experts: int,
                  capacity: Optional[int] = None, keep: Optional[mx.array] = None) -> DispatchPlan:
    """indices [T, K], weights [T, K] -> :class:`DispatchPlan`.

    With ``capacity``, each expert keeps its ``capacity`` pairs of highest weight (ties: the
    earlier pair); the rest are dropped and counted. ``keep`` [T] bool (padding mask, True =
    real token): the other tokens' pairs are left out (no row, no capacity, not counted);
    ``keep`` [T, K] bool does the same per pair (expert-choice routing).
    """
    top_k = indices.shape[1]
    flat = mx.stop_gradient(indices).reshape(-1).astype(mx.uint32)
    if keep is not None and tuple(keep.shape) not in ((indices.shape[0],), tuple(indices.shape)):
        raise ValueError(f"keep must be a bool array [T={indices.shape[0]}] or [T, K={top_k}], "
                         f"got shape {tuple(keep.shape)}")
    if keep is None:
        real = None
    elif keep.ndim == 2:
        real = keep.astype(mx.bool_).reshape(-1)  # [N]
    else:
        real = mx.repeat(keep.astype(mx.bool_), top_k)  # [N]
    # padding pairs get the key E: they sort after every expert and are cut off
    key = flat if real is None else mx.where(real, flat, num_experts).astype(mx.uint32)
    routed = histogram(key, num_experts + 1)[:num_experts]
    num_real = flat.size if real is None else int(real.sum())
    if capacity is None:
        pairs = mx.argsort(key)[:num_real]  # stable: pairs of one expert keep token order
        kept = routed
    else:
        by_weight = mx.argsort(-mx.stop_gradient(weights).reshape(-1))
        pairs = by_weight[mx.argsort(key[by_weight])]
        starts = mx.concatenate([mx.cumsum(routed) - routed, mx.array([num_real])])
        rank = mx.arange(flat.size) - starts[key[pairs]]
        fits = rank < capacity
        if real is not None:
            fits = fits & real[pairs]
        kept = mx.minimum(routed, capacity)
        num_kept = int(kept.sum())
        pairs = pairs[mx.argsort((~fits).astype(mx.uint32))[:num_kept]]  # kept ones, in order
    dropped = routed.sum() - kept.sum()
    pairs = pairs.astype(mx.uint32)
    return DispatchPlan(pairs, pairs // top_k, flat[pairs], kept, routed, dropped,
                        capacity is None and num_real == flat.size)


def combine_rows(rows: mx.array, weights: mx.array, plan: DispatchPlan, num_tokens: int) -> mx.array:
    """y[t] = sum_j w[t, j] out[t, j]: rows [M, D] expert outputs in plan order, weights [T, K]
    -> [T, D]. Dropped pairs contribute zero. Rows go back to their pair slots (the inverse
    permutation when dropless, a scatter otherwise) and are summed over K."""
    top_k = weights.shape[1]
    dim = rows.shape[1]
    if rows.shape[0] == 0:  # no tokens, or every pair dropped
        return mx.zeros((num_tokens, dim), dtype=rows.dtype)
    if plan.dropless:
        slots = rows[mx.argsort(plan.pairs)]  # [N, D] in pair order
    else:
        slots = mx.zeros((num_tokens * top_k, dim), dtype=rows.dtype).at[plan.pairs].add(rows)
    out = slots.reshape(num_tokens, top_k, dim)
    return (out * weights[..., None].astype(rows.dtype)).sum(axis=1)
