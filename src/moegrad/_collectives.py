"""The collectives of expert parallelism: a leaf module (it imports torch only).

Shapes: W ranks in the process group, E experts, D model dim. ``group`` is a torch.distributed
process group (None: the default group). :mod:`moegrad.distributed` re-exports the public names;
the layer (:func:`moegrad.layer.run_experts`), the balance losses (:mod:`moegrad.losses`) and
:class:`moegrad.balancing.BiasBalancer` use them from here, so none of them imports the
expert-parallel conversion.

    all_to_all_rows       rows with uneven splits to every rank; backward: the reverse exchange
    all_reduce_share      S = sum over ranks (differentiable; backward multiplies by W)
    all_reduce_detached   sum over ranks of a detached copy (counts, statistics)
    reduce_observation    ``default_moe``'s per-expert sums [E, D] and counts [E] over every rank
    ExchangeStats         bytes this rank sent (benchmarks)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["group_size", "group_rank", "all_to_all_rows", "all_reduce_share", "all_reduce_detached",
           "reduce_observation", "ExchangeStats"]


def group_size(group=None) -> int:
    """Number of ranks in ``group`` (the default group when None)."""
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    return dist.get_rank(group)


class _AllToAllRows(torch.autograd.Function):
    """All-to-all of rows with uneven splits; backward is the reverse exchange."""

    @staticmethod
    def forward(x, out_splits, in_splits, group, stats):
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, out_splits, in_splits, group, stats = inputs
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.stats = out_splits, in_splits, group, stats

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty(sum(ctx.in_splits), *grad_out.shape[1:])
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.in_splits, ctx.out_splits,
                               group=ctx.group)
        if ctx.stats is not None:
            ctx.stats.add_sent(grad_out, ctx.out_splits, ctx.group)
        return grad_in, None, None, None, None


def all_to_all_rows(x: Tensor, out_splits: list, in_splits: list, group=None, stats=None) -> Tensor:
    """x [sum(in_splits), ...] -> [sum(out_splits), ...]: rows in_splits[q] go to rank q, rows
    out_splits[q] come from rank q (``dist.all_to_all_single``). Differentiable: the gradient
    travels back with the splits swapped. ``stats`` (:class:`ExchangeStats`) counts bytes."""
    if stats is not None:
        stats.add_sent(x, in_splits, group)
    return _AllToAllRows.apply(x, list(out_splits), list(in_splits), group, stats)


class _AllReduceShare(torch.autograd.Function):
    """Sum over ranks; backward multiplies by W (see :func:`all_reduce_share`)."""

    @staticmethod
    def forward(x, group, world):
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.world = inputs[2]

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.world, None, None


def all_reduce_share(x: Tensor, group=None) -> Tensor:
    """S = sum over ranks of x [any shape], for a loss l = f(S) that every rank computes alike.

    The mean over ranks of l is then the global loss f(S). Backward returns W f'(S) dS/dx_r on
    each rank, so the router gradients summed over ranks are those of sum_r l_r = W f(S), the
    same convention as the per-rank shares of the other balance losses (DDP's average then gives
    exactly grad f). No collective runs in backward; only valid when every rank computes the same
    function of S, which holds for the balance losses.
    """
    return _AllReduceShare.apply(x, group, group_size(group))


@torch.no_grad()
def all_reduce_detached(x: Tensor, group=None) -> Tensor:
    """Sum over ranks of a detached copy of x (counts, statistics: no gradient)."""
    out = x.detach().clone()
    dist.all_reduce(out, group=group)
    return out


def reduce_observation(sums: Tensor, counts: Tensor, group=None) -> tuple:
    """sums [E, D] fp32, counts [E] int -> the same over every rank's tokens (one all-reduce),
    so ``default_moe`` sees global per-expert means and keeps identical buffers on every rank."""
    packed = torch.cat([sums.float(), counts.to(sums.device, torch.float32)[:, None]], dim=1)
    packed = all_reduce_detached(packed, group)
    return packed[:, :-1], packed[:, -1].round().to(counts.dtype)


class ExchangeStats:
    """Bytes this rank sent to other ranks (forward and backward), for benchmarks."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.calls = 0

    def add_sent(self, x: Tensor, splits: list, group) -> None:
        rank = group_rank(group)
        width = math.prod(x.shape[1:])
        off_rank = sum(s for q, s in enumerate(splits) if q != rank)
        self.bytes_sent += off_rank * width * x.element_size()
        self.calls += 1

    def add_bytes(self, n: int) -> None:
        self.bytes_sent += int(n)

    def reset(self) -> int:
        out, self.bytes_sent, self.calls = self.bytes_sent, 0, 0
        return out
