"""Dispatch (token, slot) pairs to experts and combine the results.

Shapes: T tokens, K top-k, E experts, N = T*K pairs, M <= N kept pairs, D model dim.
Pair p = t*K + j is token t's j-th choice. Pairs are ordered by expert with one stable sort,
so the row order (and every result) is deterministic; the backward passes sum a fixed number
of rows per token in a fixed order (no scatter-add whose order depends on atomics).

    gather:  rows[r] = x[tokens[r]]                      backward: dx[t] = sum_j drows[slot(t, j)]
    combine: y[t] = sum_j w[t, j] * rows[slot(t, j)]     backward: drows[r] = w[pair r] * dy[token r],
                                                                   dw[t, j] = <dy[t], rows[slot(t, j)]>

slot(t, j) is the row of pair t*K + j in the expert-sorted buffer; dropped pairs (capacity
mode) have no row and contribute zero.

``padded=True`` (used under torch.compile, where the kept count M is data-dependent) keeps the
buffer at a static R >= M rows: the M kept rows first (the same rows in the same order), then
R - M padding rows (dropped or padding pairs) that no token reads, whose gradient is zero and
that :class:`moegrad.experts.Experts` skips (``padded=True``: zero output rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from moegrad._spec import expert_capacity  # noqa: F401  (moegrad.dispatch.expert_capacity, as before)


@dataclass
class DispatchPlan:
    """pairs [M] kept pair ids sorted by expert; tokens [M] their token ids; experts [M] their
    expert ids; counts [E] kept rows per expert; routed [E] pairs the router assigned per expert
    (before capacity); dropped: 0-d int64, pairs over capacity (routed.sum() - counts.sum());
    slots [N] the row of each pair in the sorted buffer, -1 for a dropped pair;
    top_k: K; padded: the buffer has R >= M rows, pairs/tokens/experts [R], the kept ones first
    (counts.sum() of them), then padding rows (see the module docstring)."""

    pairs: Tensor
    tokens: Tensor
    experts: Tensor
    counts: Tensor
    routed: Tensor
    dropped: Tensor
    slots: Optional[Tensor] = None
    top_k: int = 1
    padded: bool = False

    @property
    def dropless(self) -> bool:
        """True when every pair has a row (no slot is -1); a padded plan may drop pairs."""
        return self.pairs.shape[0] == self.slots.shape[0] and not self.padded


def plan_dispatch(indices: Tensor, weights: Tensor, num_experts: int,
                  capacity: Optional[int] = None, keep: Optional[Tensor] = None, *,
                  padded: bool = False, max_rows: Optional[int] = None) -> DispatchPlan:
    """indices [T, K] int64, weights [T, K] -> :class:`DispatchPlan`.

    Dropless: one stable argsort of the N expert ids. With ``capacity``, each expert keeps its
    ``capacity`` pairs of highest weight (ties: the earlier pair) and the rest are dropped and
    counted (a second stable sort, by weight, comes first). ``keep`` [T] bool (a padding mask,
    True = real token): the pairs of the other tokens are left out altogether: they get no row
    (slot -1, zero output), take no capacity and are neither routed nor dropped in the counts.
    ``keep`` [T, K] bool does the same per pair (expert-choice routing: indices [T, E] every
    expert, keep the pairs the experts chose).

    ``padded``: static shapes (no data-dependent size, for torch.compile): the buffer holds
    R = min(N, ``max_rows``) rows (``max_rows`` None: N; it must be >= M, e.g. E * capacity),
    the kept rows exactly as without ``padded``, then padding rows; ``capacity`` may then be a
    0-d int64 tensor (a capacity computed from a mask's real-token count).
    """
    if indices.dim() != 2 or indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"indices must be an int64 tensor [T, K], got {indices.dtype} of shape "
                         f"{tuple(indices.shape)}")
    if weights.shape != indices.shape:
        raise ValueError(f"weights must match indices' shape {tuple(indices.shape)}, got "
                         f"{tuple(weights.shape)}")
    if padded and isinstance(capacity, Tensor):
        if capacity.dim() != 0 or capacity.dtype != torch.int64:
            raise ValueError(f"capacity as a tensor must be 0-d int64, got {capacity.dtype} of shape "
                             f"{tuple(capacity.shape)}")
    elif capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                   or capacity < 0):
        raise ValueError(f"capacity={capacity!r} must be None (dropless) or an int >= 0")
    top_k = indices.shape[1]
    flat = indices.reshape(-1).long()
    n = flat.numel()
    compiling = torch.compiler.is_compiling()
    if n and compiling:  # no host read under torch.compile: the same check, raised at run time
        torch._assert_async(((flat >= 0) & (flat < num_experts)).all(),
                            f"indices must lie in 0..{num_experts - 1} (num_experts={num_experts})")
    elif n and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(f"indices must lie in 0..{num_experts - 1} (num_experts={num_experts}), "
                         f"got values in {int(flat.min())}..{int(flat.max())}")
    key, num_real = flat, n  # sort key: the expert id, E for a padding pair (sorts last, cut off)
    if keep is not None:
        if keep.shape not in (indices.shape[:1], indices.shape) or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool tensor [T={indices.shape[0]}] or [T, K="
                             f"{top_k}], got {keep.dtype} of shape {tuple(keep.shape)}")
        real = keep.repeat_interleave(top_k) if keep.dim() == 1 else keep.reshape(-1)  # [N]
        key = torch.where(real, flat, num_experts)
        if padded:
            return _plan_padded(flat, key, weights, num_experts, capacity, top_k, max_rows)
        num_real = int(real.sum())
    elif padded:
        return _plan_padded(flat, key, weights, num_experts, capacity, top_k, max_rows)
    routed = count_ids(key, num_experts + 1)[:num_experts]
    arange = torch.arange(n, device=flat.device)
    if capacity is None:
        pairs = torch.argsort(key, stable=True)[:num_real]
        counts = routed
    else:
        by_weight = torch.argsort(weights.detach().reshape(-1), descending=True, stable=True)
        pairs = by_weight[torch.argsort(key[by_weight], stable=True)][:num_real]
        starts = torch.cumsum(routed, 0) - routed
        rank = arange[: pairs.shape[0]] - starts[flat[pairs]]
        kept = rank < capacity
        counts = routed.clamp(max=capacity)
        # restore pair order inside each expert (the rows of a token stay in slot order)
        pairs = pairs[kept]
        pairs = pairs[torch.argsort(flat[pairs] * n + pairs)]
    slots = torch.full((n,), -1, dtype=torch.int64, device=flat.device)
    slots[pairs] = arange[: pairs.shape[0]]
    dropped = routed.sum() - counts.sum()
    return DispatchPlan(pairs, torch.div(pairs, top_k, rounding_mode="floor"), flat[pairs], counts,
                        routed, dropped, slots, top_k)


def _plan_padded(flat: Tensor, key: Tensor, weights: Tensor, num_experts: int, capacity,
                 top_k: int, max_rows: Optional[int]) -> DispatchPlan:
    """plan_dispatch's static-shape plan: flat [N] expert ids, key [N] (E for a left-out pair)."""
    n = flat.numel()
    rows = n if max_rows is None else min(n, max_rows)
    routed = count_ids(key, num_experts + 1)[:num_experts]
    arange = torch.arange(n, device=flat.device)
    if capacity is None:
        counts = routed
    else:  # the same kept pairs as the eager plan: rank by weight inside each expert
        by_weight = torch.argsort(weights.detach().reshape(-1), descending=True, stable=True)
        order = by_weight[torch.argsort(key[by_weight], stable=True)]  # by expert, then weight
        starts = torch.cumsum(routed, 0) - routed
        rank = arange - starts[flat[order]]
        kept = (rank < capacity) & (key[order] < num_experts)
        key = torch.full_like(key, num_experts).scatter_(0, order, torch.where(kept, flat[order], num_experts))
        counts = torch.minimum(routed, capacity) if isinstance(capacity, Tensor) else routed.clamp(max=capacity)
    pairs = torch.argsort(key, stable=True)[:rows]  # kept pairs by expert (pair order), then the rest
    row = arange[:rows]
    slots = torch.full((n,), -1, dtype=torch.int64, device=flat.device)
    slots.scatter_(0, pairs, torch.where(row < counts.sum(), row, -1))
    dropped = routed.sum() - counts.sum()
    return DispatchPlan(pairs, torch.div(pairs, top_k, rounding_mode="floor"), flat[pairs], counts,
                        routed, dropped, slots, top_k, padded=True)


def count_ids(ids: Tensor, size: int) -> Tensor:
    """``torch.bincount(ids, minlength=size)`` for ids [N] in 0..size-1: [size] int64. Under
    torch.compile a scatter-add of ones (the same integers), which Dynamo traces without a
    graph break (bincount's output size depends on the data)."""
    if torch.compiler.is_compiling():
        ids = ids.long()
        return torch.zeros(size, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))
    return torch.bincount(ids, minlength=size)


@torch.library.custom_op("moegrad::snapshot", mutates_args=())
def _snapshot_op(t: Tensor) -> Tensor:
    return t.clone()


@_snapshot_op.register_fake
def _(t):
    return torch.empty_like(t)


def snapshot(t: Tensor) -> Tensor:
    """A copy of t (no gradient). Under torch.compile an opaque op: AOT autograd's partitioner
    would otherwise recompute a buffer read in the backward pass from the graph's input, which
    the forward has by then updated in place (running state: ReMoE's lambda), and use the
    wrong value."""
    return torch.ops.moegrad.snapshot(t) if torch.compiler.is_compiling() else t.detach().clone()


def _plan_slots(plan: DispatchPlan) -> Tensor:
    if plan.slots is None:  # a plan built by hand: derive the inverse permutation
        raise ValueError("the DispatchPlan has no slots; build it with plan_dispatch()")
    return plan.slots


class _Gather(torch.autograd.Function):
    """rows = x[tokens]; backward sums each token's K row gradients (fixed order)."""

    @staticmethod
    def forward(x, tokens, slots, num_tokens, top_k, dropless):
        return x.index_select(0, tokens)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, tokens, slots, num_tokens, top_k, dropless = inputs
        ctx.save_for_backward(slots)
        ctx.num_tokens, ctx.top_k = num_tokens, top_k
        ctx.dropless = dropless

    @staticmethod
    def backward(ctx, grad_rows):
        (slots,) = ctx.saved_tensors
        t, k = ctx.num_tokens, ctx.top_k
        if ctx.dropless:
            per_pair = grad_rows.index_select(0, slots)  # [N, D] in pair order
        else:  # dropped pairs read a zero row appended at the end
            padded = torch.cat([grad_rows, grad_rows.new_zeros(1, grad_rows.shape[1])])
            per_pair = padded.index_select(0, torch.where(slots < 0, grad_rows.shape[0], slots))
        grad_x = per_pair.view(t, k, grad_rows.shape[1]).sum(1) if k > 1 else per_pair
        return grad_x, None, None, None, None, None


def gather_rows(x: Tensor, plan: DispatchPlan) -> Tensor:
    """x [T, D] -> rows [M, D] in expert order (rows[r] = x[plan.tokens[r]]).

    The backward is a deterministic gather-and-sum over each token's K slots, never a dense
    zero tensor per expert nor an atomics-ordered scatter.
    """
    num_tokens = plan.slots.shape[0] // plan.top_k if plan.slots is not None else x.shape[0]
    slots = _plan_slots(plan)
    return _Gather.apply(x, plan.tokens, slots, num_tokens, plan.top_k, plan.dropless)


class _Combine(torch.autograd.Function):
    """y[t] = sum_j w[t, j] rows[slot(t, j)]; saves the gathered [T, K, D] rows (same size as
    rows) only when the weights need a gradient."""

    @staticmethod
    def forward(rows, weights, tokens, slots, pairs, dropless):
        t, k = weights.shape
        w = weights.to(rows.dtype)
        if rows.shape[0] == 0:
            return rows.new_zeros(t, rows.shape[1]), rows.new_zeros(t, k, rows.shape[1])
        if not dropless:  # dropped pairs: weight 0 on (any) row 0
            w = w * (slots >= 0).view(t, k).to(w.dtype)
            slots = slots.clamp(min=0)
        gathered = rows.index_select(0, slots).view(t, k, -1)  # [T, K, D]
        y = torch.bmm(w.unsqueeze(1), gathered).squeeze(1) if k > 1 else gathered[:, 0] * w
        return y, gathered

    @staticmethod
    def setup_context(ctx, inputs, output):
        rows, weights, tokens, slots, pairs, dropless = inputs
        _, gathered = output
        ctx.dropless = dropless
        ctx.mark_non_differentiable(gathered)
        ctx.set_materialize_grads(False)  # no [T, K, D] zero gradient for the saved-only output
        ctx.need_w = weights.requires_grad
        ctx.w_dtype = weights.dtype
        ctx.save_for_backward(weights, tokens, slots, pairs, gathered if ctx.need_w else None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _unused):
        weights, tokens, slots, pairs, gathered = ctx.saved_tensors
        grad_rows = grad_w = None
        if grad_y is None:  # y was not used
            return None, None, None, None, None, None
        g = grad_y.contiguous()
        if ctx.needs_input_grad[0]:
            w_sorted = weights.reshape(-1).index_select(0, pairs).to(g.dtype)  # [M]
            if not ctx.dropless:  # a padded plan's padding rows get no gradient
                w_sorted = w_sorted * (slots.index_select(0, pairs) >= 0).to(g.dtype)
            grad_rows = g.index_select(0, tokens).mul_(w_sorted[:, None])
        if ctx.needs_input_grad[1]:
            if gathered.numel() == 0:
                grad_w = torch.zeros_like(weights)
            else:
                grad_w = torch.bmm(gathered, g.unsqueeze(2)).squeeze(2)  # [T, K]
                if not ctx.dropless:
                    grad_w = grad_w * (slots >= 0).view_as(grad_w).to(grad_w.dtype)
                grad_w = grad_w.to(ctx.w_dtype)
        return grad_rows, grad_w, None, None, None, None


def combine_rows(rows: Tensor, weights: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """y[t] = sum_j w[t, j] * out[t, j]: rows [M, D] expert outputs, weights [T, K] -> [T, D].

    Dropped pairs contribute zero (and get zero weight gradient). Each token reads its K rows
    and sums them in slot order (no atomics), so the result is deterministic. The weights are
    cast to the rows' dtype for the sum; their gradient comes back in their own dtype.
    """
    if weights.shape[0] != num_tokens:
        raise ValueError(f"weights must be [T={num_tokens}, K], got shape {tuple(weights.shape)}")
    if rows.shape[0] != plan.pairs.shape[0]:
        raise ValueError(f"rows must have the plan's M={plan.pairs.shape[0]} rows, got {rows.shape[0]}")
    y, _ = _Combine.apply(rows, weights, plan.tokens, _plan_slots(plan), plan.pairs, plan.dropless)
    return y
