"""Stacked expert weights and the grouped expert computation.

Shapes: N routed rows (sorted by expert), D model dim, H hidden dim, E experts,
C the largest group (padded ``bmm`` layout), R rows of a backend's layout (N, or E*C padded).
Weights by role (:class:`moegrad._interfaces.ExpertWeights`; :class:`Experts` keeps them as
the parameters w1, w3, w2): gate = w1 [E, H, D] (the activated projection, HF "gate_proj"),
up = w3 [E, H, D] (SwiGLU only, HF "up_proj"), down = w2 [E, D, H] (HF "down_proj").

    swiglu: E_i(x) = down_i (silu(gate_i x) * (up_i x))
    gelu:   E_i(x) = down_i gelu(gate_i x)

:class:`Experts` implements the experts protocol :class:`moegrad._interfaces.ExpertsModule`:
``stacked_weights()`` -> ExpertWeights, ``every_expert(x, weights)`` and
``unselected_inner_products(x, grad_y, indices, weights)`` take that named tuple as one argument.

:func:`grouped_mlp` runs expert e on its ``counts[e]`` consecutive rows with hand-written
backwards in two autograd nodes: the up-projection (gate and up, saves the rows) and the
activation + down-projection (saves the pre-activations gate_x = gate x, up_x = up x and
recomputes the activation in backward). Two nodes rather than one let autograd free gate_x,
up_x and the incoming gradient before the up-projection's weight gradients are made (peak
memory). The matrix products go
through one of the backends in :data:`IMPLS`:

* ``loop``: one ``torch.mm`` per non-empty expert on row slices (no copies, no padding);
* ``grouped_mm``: ``torch.nn.functional.grouped_mm`` with int32 offsets (fp32/bf16/fp16 only;
  every row stride, including the weights', must be a multiple of 16 bytes);
* ``bmm``: the groups padded to the largest one, C rows each, and one ``torch.bmm`` per product
  (wins for many small, balanced groups; pays E*C - N padded rows);
* ``auto``: :func:`choose_impl`, a rule measured on this package's CPU benchmark (see there).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moegrad._checks import check_choice, check_int
from moegrad._interfaces import ExpertWeights, rebuild_weights

ACTIVATIONS = ("gelu", "swiglu")
#: grouped-compute backends; "auto" picks one by a measured rule (:func:`choose_impl`)
IMPLS = ("auto", "bmm", "grouped_mm", "loop")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- backend rule
def grouped_mm_applicable(rows: Tensor, *weights: Tensor) -> Optional[str]:
    """None when ``F.grouped_mm`` can run these operands, else the reason why not."""
    if not hasattr(F, "grouped_mm"):
        return "torch.nn.functional.grouped_mm is not available in this torch"
    if rows.dtype not in _GROUPED_MM_DTYPES:
        return f"grouped_mm supports {[str(d) for d in _GROUPED_MM_DTYPES]}, got {rows.dtype}"
    size = rows.element_size()
    for t in (rows,) + weights:
        if t is None:
            continue
        bad = [s for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1 and (s * size) % 16]
        if bad or t.storage_offset() * size % 16:
            return (f"grouped_mm needs row strides and offsets that are multiples of 16 bytes; "
                    f"a tensor of shape {tuple(t.shape)} has strides {t.stride()}")
    dim, hidden = weights[0].shape[2], weights[0].shape[1]
    if (dim * size) % 16 or (hidden * size) % 16:
        return f"grouped_mm needs D*{size} and H*{size} bytes to be multiples of 16 (D={dim}, H={hidden})"
    return None


def choose_impl(num_rows: int, num_experts: int, max_count: int, dtype: torch.dtype,
                grouped_mm_ok: bool) -> str:
    """The ``auto`` rule, from interleaved fwd+bwd timings in ``moegrad bench`` (torch 2.13 CPU,
    fp32, on a 2-core machine shared with other jobs; ``benchmarks/README.md`` has both runs):

    * 1 thread, E=8/64/128 with 1024/256/64 rows per expert: ``grouped_mm`` 1.28/1.50/1.65x
      the dense ideal, ``loop`` 1.24/1.36/1.68x, padded ``bmm`` 1.51/2.20/2.23x: padding
      (E*C/N = 1.07/1.15/1.5 for a random router) costs more than the calls it saves;
    * 2 threads on the loaded machine, E=64/128: ``bmm`` 1.6-1.9x, ``grouped_mm`` 2.2-6x,
      ``loop`` 6-12x: each small multi-threaded GEMM pays a thread barrier, which a
      descheduled thread turns into milliseconds; ``bmm`` makes 9 calls per step.

    * profile of E=8 (1 thread): ``aten::mm`` takes 0.95 s/step through ``loop`` and 1.04 s
      through ``grouped_mm``'s CPU kernel for the same products.

    So: no padding unless the groups are tiny (mean N/E <= 32 rows, where per-call overhead
    dominates a GEMM of ~32 rows) and padding at most doubles the work (E*C <= 2N), then
    ``bmm``; ``loop`` for large groups (mean >= 256 rows); ``grouped_mm`` in between where it
    applies (one call instead of E Python-level calls), else ``loop``.
    """
    if num_rows == 0:
        return "loop"
    mean = num_rows / num_experts
    if num_experts > 1 and mean <= 32 and num_experts * max_count <= 2 * num_rows:
        return "bmm"
    if mean >= 256:
        return "loop"
    return "grouped_mm" if grouped_mm_ok else "loop"


# ----------------------------------------------------------------------------- backends
class _Loop:
    """Row-slice products, one ``torch.mm`` per non-empty expert."""

    def __init__(self, counts: Tensor, num_rows: int) -> None:
        sizes = counts.tolist()
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        self.groups = [(e, starts[e], starts[e + 1]) for e, n in enumerate(sizes) if n]
        self.num_experts = len(sizes)
        self.rows = num_rows

    def enter(self, rows: Tensor) -> Tensor:
        return rows

    def exit(self, rows: Tensor) -> Tensor:
        return rows

    def linear(self, x: Tensor, w: Tensor) -> Tensor:
        """x [R, in], w [E, out, in] -> [R, out]: x_e w_e^T."""
        out = x.new_empty(x.shape[0], w.shape[1])
        for e, a, b in self.groups:
            torch.mm(x[a:b], w[e].t(), out=out[a:b])
        return out

    def matmul(self, dy: Tensor, w: Tensor) -> Tensor:
        """dy [R, out], w [E, out, in] -> [R, in]: dy_e w_e."""
        out = dy.new_empty(dy.shape[0], w.shape[2])
        for e, a, b in self.groups:
            torch.mm(dy[a:b], w[e], out=out[a:b])
        return out

    def matmul_add(self, dy: Tensor, w: Tensor, out: Tensor) -> Tensor:
        """out += dy_e w_e in place (no [R, in] temporary); returns out."""
        for e, a, b in self.groups:
            torch.addmm(out[a:b], dy[a:b], w[e], out=out[a:b])
        return out

    def wgrad(self, dy: Tensor, x: Tensor) -> Tensor:
        """dy [R, out], x [R, in] -> [E, out, in]: dy_e^T x_e (zeros for empty experts)."""
        if len(self.groups) < self.num_experts:
            out = dy.new_zeros(self.num_experts, dy.shape[1], x.shape[1])
        else:
            out = dy.new_empty(self.num_experts, dy.shape[1], x.shape[1])
        for e, a, b in self.groups:
            torch.mm(dy[a:b].t(), x[a:b], out=out[e])
        return out


class _GroupedMM(_Loop):
    """``F.grouped_mm`` with int32 end offsets."""

    def __init__(self, counts: Tensor, num_rows: int) -> None:
        self.offs = torch.cumsum(counts, 0).to(torch.int32)
        self.rows = num_rows

    def linear(self, x, w):
        return F.grouped_mm(x, w.transpose(-2, -1), offs=self.offs)

    def matmul(self, dy, w):
        return F.grouped_mm(dy, w, offs=self.offs)

    def matmul_add(self, dy, w, out):
        return out.add_(self.matmul(dy, w))

    def wgrad(self, dy, x):
        return F.grouped_mm(dy.t(), x, offs=self.offs)


class _Padded(_Loop):
    """Groups padded to C rows: row i of expert e sits at e*C + i of an [E*C, .] buffer whose
    padding rows are zero (they stay zero through the bias-free MLP and add nothing to dW)."""

    def __init__(self, counts: Tensor, num_rows: int) -> None:
        self.num_experts = counts.shape[0]
        self.rows = num_rows
        self.cap = int(counts.max()) if num_rows else 0
        experts = torch.repeat_interleave(torch.arange(self.num_experts, device=counts.device), counts)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(num_rows, device=counts.device) - starts[experts]
        self.pos = experts * self.cap + rank  # [N] padded position of each row

    def enter(self, rows):
        out = rows.new_zeros(self.num_experts * self.cap, rows.shape[1])
        return out.index_copy_(0, self.pos, rows)

    def exit(self, rows):
        return rows.index_select(0, self.pos)

    def linear(self, x, w):
        e, c = self.num_experts, self.cap
        return torch.bmm(x.view(e, c, x.shape[1]), w.transpose(1, 2)).view(e * c, w.shape[1])

    def matmul(self, dy, w):
        e, c = self.num_experts, self.cap
        return torch.bmm(dy.view(e, c, dy.shape[1]), w).view(e * c, w.shape[2])

    def matmul_add(self, dy, w, out):
        e, c = self.num_experts, self.cap
        view = out.view(e, c, out.shape[1])
        torch.baddbmm(view, dy.view(e, c, dy.shape[1]), w, out=view)
        return out

    def wgrad(self, dy, x):
        e, c = self.num_experts, self.cap
        return torch.bmm(dy.view(e, c, dy.shape[1]).transpose(1, 2), x.view(e, c, x.shape[1]))


_BACKENDS = {"loop": _Loop, "grouped_mm": _GroupedMM, "bmm": _Padded}


# ----------------------------------------------------------------------------- the MLP
def _activate(gate_x: Tensor, up_x: Optional[Tensor]) -> Tensor:
    """silu(gate_x) * up_x (one new [R, H] buffer), or gelu(gate_x) without up_x."""
    return F.silu(gate_x).mul_(up_x) if up_x is not None else F.gelu(gate_x)


def _up_forward(ops, x: Tensor, gate: Tensor, up: Optional[Tensor]) -> tuple:
    """(gate x, up x) in the backend's layout; x already entered."""
    return ops.linear(x, gate), (ops.linear(x, up) if up is not None else None)


def _up_backward(ops, x, d_gate_x, d_up_x, gate, up, need_x, need_gate, need_up) -> tuple:
    """(dx in row order, d_gate, d_up) of the up-projection; x and the gradients in the layout."""
    dx = None  # first, so a backend's temporary is gone before the [E, H, D] weight gradients
    if need_x:
        for dh, w in ((d_gate_x, gate), (d_up_x, up)):
            if dh is not None:
                dx = ops.matmul(dh, w) if dx is None else ops.matmul_add(dh, w, dx)
        dx = ops.exit(dx) if dx is not None else None
    d_gate = ops.wgrad(d_gate_x, x) if need_gate and d_gate_x is not None else None
    d_up = ops.wgrad(d_up_x, x) if need_up and d_up_x is not None else None
    return dx, d_gate, d_up


def _down_backward(ops, grad_out, gate_x, up_x, down, need_gate_x, need_up_x, need_down) -> tuple:
    """(d_gate_x, d_up_x in the layout, d_down) of out = down act(gate_x, up_x); grad_out in row order."""
    g = ops.enter(grad_out.contiguous())  # grouped_mm's products need a dense gradient
    # at most two new [R, H] buffers live at a time (peak memory): s becomes d_up_x and da
    # becomes d_gate_x in place
    s = F.silu(gate_x) if up_x is not None else None  # computed once, for act and d_up_x
    d_down = None
    if need_down:
        act = s * up_x if s is not None else F.gelu(gate_x)
        d_down = ops.wgrad(g, act)
        del act
    da = ops.matmul(g, down)  # [R, H]
    del g
    d_up_x = s.mul_(da) if up_x is not None and need_up_x else None  # da * silu(gate_x)
    del s
    d_gate_x = None
    if need_gate_x:
        if up_x is not None:
            d_gate_x = torch.ops.aten.silu_backward.grad_input(da.mul_(up_x), gate_x, grad_input=da)
        else:
            d_gate_x = torch.ops.aten.gelu_backward.grad_input(da, gate_x, grad_input=da)
    return d_gate_x, d_up_x, d_down


class _UpProjection(torch.autograd.Function):
    """(gate_x, up_x) = (gate x, up x) per group, in the backend's row layout (up_x None for GELU)."""

    @staticmethod
    def forward(rows, counts, impl, gate, up):
        ops = _BACKENDS[impl](counts, rows.shape[0])
        return _up_forward(ops, ops.enter(rows), gate, up)

    @staticmethod
    def setup_context(ctx, inputs, output):
        rows, counts, impl, gate, up = inputs
        ctx.impl = impl
        ctx.save_for_backward(rows, counts, gate, up)
        ctx.set_materialize_grads(False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_gate_x, d_up_x):
        rows, counts, gate, up = ctx.saved_tensors
        need_x, _, _, need_gate, need_up = ctx.needs_input_grad
        ops = _BACKENDS[ctx.impl](counts, rows.shape[0])
        dx, d_gate, d_up = _up_backward(ops, ops.enter(rows), d_gate_x, d_up_x, gate, up,
                                        need_x, need_gate, need_up)
        return dx, None, None, d_gate, d_up


class _DownProjection(torch.autograd.Function):
    """out = down act(gate_x, up_x) per group, back in row order; saves gate_x, up_x and
    recomputes act."""

    @staticmethod
    def forward(gate_x, up_x, counts, impl, down, num_rows):
        ops = _BACKENDS[impl](counts, num_rows)
        return ops.exit(ops.linear(_activate(gate_x, up_x), down))

    @staticmethod
    def setup_context(ctx, inputs, output):
        gate_x, up_x, counts, impl, down, num_rows = inputs
        ctx.impl, ctx.num_rows = impl, num_rows
        ctx.save_for_backward(gate_x, up_x, counts, down)
        ctx.set_materialize_grads(False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        gate_x, up_x, counts, down = ctx.saved_tensors
        need_gate_x, need_up_x, _, _, need_down, _ = ctx.needs_input_grad
        if grad_out is None:  # the output was not used
            return None, None, None, None, None, None
        ops = _BACKENDS[ctx.impl](counts, ctx.num_rows)
        d_gate_x, d_up_x, d_down = _down_backward(ops, grad_out, gate_x, up_x, down,
                                                  need_gate_x, need_up_x, need_down)
        return d_gate_x, d_up_x, None, None, d_down, None


def _check_mlp(rows: Tensor, counts: Tensor, w1: Tensor, w2: Tensor, w3: Optional[Tensor],
               activation: str, impl: str, host: bool = True) -> None:
    """The argument checks; ``host=False`` leaves out the one reading ``counts`` on the host
    (under torch.compile the custom op runs it, with real tensors)."""
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("impl", impl, IMPLS)
    for name, t in (("rows", rows), ("counts", counts), ("w1", w1), ("w2", w2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if w1.dim() != 3:
        raise ValueError(f"w1 must be [E, H, D], got shape {tuple(w1.shape)}")
    e, h, d = w1.shape
    if rows.dim() != 2 or rows.shape[1] != d:
        raise ValueError(f"rows must be [N, D={d}] (D from w1 [E, H, D]), got shape {tuple(rows.shape)}")
    if counts.shape != (e,) or counts.dtype in (torch.float16, torch.bfloat16, torch.float32,
                                                  torch.float64, torch.bool):
        raise ValueError(f"counts must be an integer tensor of shape [E={e}], got "
                         f"{counts.dtype} of shape {tuple(counts.shape)}")
    if tuple(w2.shape) != (e, d, h):
        raise ValueError(f"w2 must be [E, D, H] = {(e, d, h)}, got shape {tuple(w2.shape)}")
    if activation == "swiglu":
        if w3 is None:
            raise ValueError("activation='swiglu' needs w3 [E, H, D] (the HF 'up' projection); "
                             "pass w3 or use activation='gelu'")
        if tuple(w3.shape) != (e, h, d):
            raise ValueError(f"w3 must be [E, H, D] = {(e, h, d)}, got shape {tuple(w3.shape)}")
    elif w3 is not None:
        raise ValueError("activation='gelu' takes no w3; pass w3=None or use activation='swiglu'")
    for name, t in (("w1", w1), ("w2", w2), ("w3", w3)):
        if t is not None and t.dtype != rows.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but rows have {rows.dtype}; they must match")
    if host:
        _check_counts(rows, counts)


def _kept_rows(rows: Tensor, counts: Tensor) -> int:
    """M = counts.sum() of a padded call (rows [N, D], counts [E] >= 0, M <= N)."""
    total = int(counts.sum())
    if total > rows.shape[0] or bool((counts < 0).any()):
        raise ValueError(f"padded: counts must be >= 0 and sum to at most the N={rows.shape[0]} rows, "
                         f"got a sum of {total}")
    return total


def _unpad(m: int, *tensors: Optional[Tensor]) -> tuple:
    """The first m rows of each tensor (None stays None)."""
    return tuple(t if t is None or t.shape[0] == m else t[:m] for t in tensors)


def _pad(n: int, t: Tensor) -> Tensor:
    """t [m, ...] -> [n, ...] with zero rows m.. (an empty [0] placeholder stays as it is)."""
    if t.dim() == 1 or t.shape[0] == n:
        return t
    return torch.cat([t, t.new_zeros(n - t.shape[0], *t.shape[1:])])


def _check_counts(rows: Tensor, counts: Tensor) -> None:
    total = int(counts.sum())
    if total != rows.shape[0] or bool((counts < 0).any()):
        raise ValueError(f"counts must be >= 0 and sum to the N={rows.shape[0]} rows, got "
                         f"{counts.tolist() if counts.shape[0] <= 16 else f'a sum of {total}'}")


def grouped_mlp(rows: Tensor, counts: Tensor, w1: Tensor, w2: Tensor, w3: Optional[Tensor] = None,
                activation: str = "swiglu", impl: str = "auto", padded: bool = False) -> Tensor:
    """Expert e's MLP on its ``counts[e]`` consecutive rows: rows [N, D] -> [N, D].

    w1 [E, H, D] (activated projection, HF "gate"), w3 [E, H, D] or None (HF "up"), w2 [E, D, H]
    (HF "down"); views (e.g. slices of a fused gate_up [E, 2H, D]) are accepted as they are.
    ``activation``: "swiglu" (w2 (silu(w1 x) * w3 x), needs w3) or "gelu" (w2 gelu(w1 x)).
    ``impl``: one of :data:`IMPLS`; "grouped_mm" raises ValueError where it cannot run
    (dtype, 16-byte strides), "auto" falls back. Differentiable in rows and all weights
    (first order); deterministic. Under ``torch.autocast`` rows and weights are cast to the
    autocast dtype (the output has that dtype, gradients flow back to the original dtypes).
    ``padded``: counts may sum to M <= N; rows M.. are padding (a padded
    :class:`~moegrad.dispatch.DispatchPlan`): not computed, output rows 0, gradient 0.
    """
    device = rows.device.type if isinstance(rows, Tensor) else "cpu"
    if isinstance(rows, Tensor) and torch.is_autocast_enabled(device):
        # torch.autocast: run the whole MLP in the autocast dtype with explicit casts (the
        # hand-written backward then sees one dtype), autocast itself off inside
        low = torch.get_autocast_dtype(device)
        w3 = w3.to(low) if isinstance(w3, Tensor) else w3
        with torch.autocast(device, enabled=False):
            return grouped_mlp(rows.to(low), counts, w1.to(low), w2.to(low), w3, activation, impl, padded)
    compiling = torch.compiler.is_compiling()
    _check_mlp(rows, counts, w1, w2, w3, activation, impl, host=not compiling and not padded)
    gate, down, up = w1, w2, w3
    if compiling:  # opaque custom ops: no graph break (see "torch.compile" below)
        gate_x, up_x, code = torch.ops.moegrad.mlp_up(rows, counts, gate, up, down, impl, padded)
        return torch.ops.moegrad.mlp_down(gate_x, up_x if up is not None else None, counts, down, code, padded)
    if padded:
        m = _kept_rows(rows, counts)
        out = grouped_mlp(rows[:m], counts, w1, w2, w3, activation, impl)
        return torch.cat([out, out.new_zeros(rows.shape[0] - m, out.shape[1])]) if m < rows.shape[0] else out
    impl = _pick_impl(rows, counts, impl, gate, down, up)
    if impl == "grouped_mm":
        # grouped_mm reads the weights through their strides; give it dense operands if needed
        gate, up, down = _aligned(ExpertWeights(gate, up, down), rows)
    return _apply_mlp(rows.contiguous(), counts, impl, gate, down, up)


def _pick_impl(rows: Tensor, counts: Tensor, impl: str, gate: Tensor, down: Tensor, up: Optional[Tensor]) -> str:
    """The backend grouped_mlp runs: ``impl``, or :func:`choose_impl`'s for "auto" (reads counts)."""
    why_not = grouped_mm_applicable(rows, gate, down, up) if impl in ("auto", "grouped_mm") else None
    if impl == "grouped_mm" and why_not is not None:
        raise ValueError(f"impl='grouped_mm' cannot run here: {why_not}; use impl='auto', 'loop' or 'bmm'")
    if impl == "auto":
        max_count = int(counts.max()) if rows.shape[0] else 0
        impl = choose_impl(rows.shape[0], gate.shape[0], max_count, rows.dtype, why_not is None)
    return impl


def _apply_mlp(rows, counts, impl, gate, down, up):
    gate_x, up_x = _UpProjection.apply(rows, counts, impl, gate, up)
    return _DownProjection.apply(gate_x, up_x, counts, impl, down, rows.shape[0])


# ----------------------------------------------------------------------------- torch.compile
# Under torch.compile grouped_mlp runs as opaque custom ops (torch.library) that Dynamo traces
# around without a graph break: the groups are data-dependent (the loop's slices, bmm's
# padding and auto's choice read counts on the host), grouped_mm's fake kernel accepts only
# bf16 in torch 2.13, and the stride/offset check reads storage offsets Dynamo cannot. The ops
# pass tensors in row order (bmm pads and unpads inside each op) and run the eager products;
# mlp_up picks the backend once, with the eager rule, and hands it on as a 0-d int64 code.
_CODES = ("loop", "grouped_mm", "bmm")


def _backend(code: Tensor, counts: Tensor, num_rows: int):
    return _BACKENDS[_CODES[int(code)]](counts, num_rows)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


@torch.library.custom_op("moegrad::mlp_up", mutates_args=())
def _mlp_up_op(rows: Tensor, counts: Tensor, gate: Tensor, up: Optional[Tensor], down: Tensor,
               impl: str, padded: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(gate rows [N, H], up rows [N, H] ([0] for GELU), backend code) in row order;
    ``padded``: rows counts.sum().. are padding (zero rows out)."""
    n = rows.shape[0]
    if padded:
        (rows,) = _unpad(_kept_rows(rows, counts), rows)
    else:
        _check_counts(rows, counts)
    impl = _pick_impl(rows, counts, impl, gate, down, up)
    rows = rows.contiguous()
    ops = _BACKENDS[impl](counts, rows.shape[0])
    gate_x, up_x = _up_forward(ops, ops.enter(rows), gate, up)
    code = torch.tensor(_CODES.index(impl), dtype=torch.int64)
    return (_pad(n, ops.exit(gate_x)), _or_empty(_pad(n, ops.exit(up_x)) if up_x is not None else None, rows),
            code)


@_mlp_up_op.register_fake
def _(rows, counts, gate, up, down, impl, padded=False):
    n, h = rows.shape[0], gate.shape[1]
    return (rows.new_empty(n, h), rows.new_empty(n, h) if up is not None else rows.new_empty(0),
            torch.empty((), dtype=torch.int64))


@torch.library.custom_op("moegrad::mlp_up_backward", mutates_args=())
def _mlp_up_backward_op(d_gate_x: Tensor, d_up_x: Optional[Tensor], rows: Tensor, counts: Tensor,
                        gate: Tensor, up: Optional[Tensor], code: Tensor, need_x: bool, need_gate: bool,
                        need_up: bool, padded: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(d rows [N, D], d gate [E, H, D], d up [E, H, D]); [0] where not needed."""
    n = rows.shape[0]
    if padded:
        d_gate_x, d_up_x, rows = _unpad(int(counts.sum()), d_gate_x, d_up_x, rows)
    ops = _backend(code, counts, rows.shape[0])
    d_up_x = ops.enter(d_up_x.contiguous()) if d_up_x is not None else None
    dx, d_gate, d_up = _up_backward(ops, ops.enter(rows.contiguous()), ops.enter(d_gate_x.contiguous()), d_up_x, gate,
                                    up, need_x, need_gate, need_up)
    return _or_empty(_pad(n, dx) if dx is not None else None, rows), _or_empty(d_gate, rows), _or_empty(d_up, rows)


@_mlp_up_backward_op.register_fake
def _(d_gate_x, d_up_x, rows, counts, gate, up, code, need_x, need_gate, need_up, padded=False):
    empty = rows.new_empty(0)
    return (torch.empty_like(rows) if need_x else empty, torch.empty_like(gate) if need_gate else empty,
            torch.empty_like(up) if need_up else empty)


def _mlp_up_setup(ctx, inputs, output):
    rows, counts, gate, up, _, _ = inputs[:6]
    ctx.padded = bool(inputs[6]) if len(inputs) > 6 else False
    ctx.has_up = up is not None
    ctx.save_for_backward(rows, counts, gate, up, output[2])


def _mlp_up_grad(ctx, d_gate_x, d_up_x, _code):
    rows, counts, gate, up, code = ctx.saved_tensors
    need_x, _, need_gate, need_up = ctx.needs_input_grad[:4]
    need_up = bool(need_up and ctx.has_up)
    dx, d_gate, d_up = torch.ops.moegrad.mlp_up_backward(
        d_gate_x, d_up_x if ctx.has_up else None, rows, counts, gate, up, code, need_x, need_gate, need_up,
        ctx.padded)
    return (dx if need_x else None, None, d_gate if need_gate else None, d_up if need_up else None,
            None, None, None)


_mlp_up_op.register_autograd(_mlp_up_grad, setup_context=_mlp_up_setup)


@torch.library.custom_op("moegrad::mlp_down", mutates_args=())
def _mlp_down_op(gate_x: Tensor, up_x: Optional[Tensor], counts: Tensor, down: Tensor, code: Tensor,
                 padded: bool = False) -> Tensor:
    """down act(gate_x, up_x) per group: [N, H] rows -> [N, D]."""
    n = gate_x.shape[0]
    if padded:
        gate_x, up_x = _unpad(int(counts.sum()), gate_x, up_x)
    ops = _backend(code, counts, gate_x.shape[0])
    act = _activate(ops.enter(gate_x), ops.enter(up_x) if up_x is not None else None)
    return _pad(n, ops.exit(ops.linear(act, down)))


@_mlp_down_op.register_fake
def _(gate_x, up_x, counts, down, code, padded=False):
    return gate_x.new_empty(gate_x.shape[0], down.shape[1])


@torch.library.custom_op("moegrad::mlp_down_backward", mutates_args=())
def _mlp_down_backward_op(grad_out: Tensor, gate_x: Tensor, up_x: Optional[Tensor], counts: Tensor,
                          down: Tensor, code: Tensor, need_gate_x: bool, need_up_x: bool,
                          need_down: bool, padded: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(d gate_x [N, H], d up_x [N, H], d down [E, D, H]) in row order; [0] where not needed."""
    n = gate_x.shape[0]
    if padded:
        grad_out, gate_x, up_x = _unpad(int(counts.sum()), grad_out, gate_x, up_x)
    ops = _backend(code, counts, gate_x.shape[0])
    d_gate_x, d_up_x, d_down = _down_backward(ops, grad_out, ops.enter(gate_x),
                                              ops.enter(up_x) if up_x is not None else None, down,
                                              need_gate_x, need_up_x, need_down)
    return (_or_empty(_pad(n, ops.exit(d_gate_x)) if d_gate_x is not None else None, gate_x),
            _or_empty(_pad(n, ops.exit(d_up_x)) if d_up_x is not None else None, gate_x), _or_empty(d_down, gate_x))


@_mlp_down_backward_op.register_fake
def _(grad_out, gate_x, up_x, counts, down, code, need_gate_x, need_up_x, need_down, padded=False):
    empty = gate_x.new_empty(0)
    return (torch.empty_like(gate_x) if need_gate_x else empty,
            torch.empty_like(gate_x) if need_up_x else empty, torch.empty_like(down) if need_down else empty)


def _mlp_down_setup(ctx, inputs, output):
    gate_x, up_x, counts, down, code = inputs[:5]
    ctx.padded = bool(inputs[5]) if len(inputs) > 5 else False
    ctx.has_up = up_x is not None
    ctx.save_for_backward(gate_x, up_x, counts, down, code)


def _mlp_down_grad(ctx, grad_out):
    gate_x, up_x, counts, down, code = ctx.saved_tensors
    need_gate_x, need_up_x, _, need_down = ctx.needs_input_grad[:4]
    need_up_x = bool(need_up_x and ctx.has_up)
    d_gate_x, d_up_x, d_down = torch.ops.moegrad.mlp_down_backward(
        grad_out, gate_x, up_x, counts, down, code, need_gate_x, need_up_x, need_down, ctx.padded)
    return (d_gate_x if need_gate_x else None, d_up_x if need_up_x else None, None,
            d_down if need_down else None, None, None)


_mlp_down_op.register_autograd(_mlp_down_grad, setup_context=_mlp_down_setup)


@torch.library.custom_op("moegrad::unselected_inner_products", mutates_args=())
def _unselected_op(x: Tensor, grad_y: Tensor, indices: Tensor, gate: Tensor, up: Optional[Tensor],
                   down: Tensor, impl: str) -> Tensor:
    """:func:`unselected_inner_products` run eagerly: [t, E] (its pair list is data-dependent)."""
    return unselected_inner_products(x, grad_y, indices, ExpertWeights(gate=gate, up=up, down=down), impl)


@_unselected_op.register_fake
def _(x, grad_y, indices, gate, up, down, impl):
    return x.new_empty(x.shape[0], gate.shape[0])


@torch.no_grad()
def unselected_inner_products(x: Tensor, grad_y: Tensor, indices: Tensor, weights: ExpertWeights,
                              impl: str = "auto") -> Tensor:
    """<g_t, E_i(x_t)> [t, E] for every expert i not in indices[t], 0 for the selected ones.

    x, grad_y [t, D], indices [t, K], ``weights`` an :class:`ExpertWeights` (gate, up, down).
    Only the t*(E-K) unselected (token, expert) pairs are evaluated, grouped by expert through
    the same backends as :func:`grouped_mlp`, and the down-projection is folded into the inner
    product: <g, down_i a_i> = <down_i^T g, a_i> with a_i = act(gate_i x, up_i x) [H] (SwiGLU
    with up, GELU without), so no [t, E, D] tensor is formed. No gradient (used by the
    ``dense`` estimator's backward).
    """
    if torch.compiler.is_compiling():  # an opaque custom op (the pair list is data-dependent)
        return torch.ops.moegrad.unselected_inner_products(x, grad_y, indices, weights.gate, weights.up,
                                                           weights.down, impl)
    num_tokens, num_experts = x.shape[0], weights.gate.shape[0]
    unselected = torch.ones(num_tokens, num_experts, dtype=torch.bool, device=x.device)
    unselected.scatter_(1, indices, False)
    experts, tokens = unselected.t().nonzero().unbind(1)  # [P] pairs sorted by expert
    out = torch.zeros(num_tokens, num_experts, dtype=x.dtype, device=x.device)
    if tokens.numel() == 0:
        return out
    counts = torch.bincount(experts, minlength=num_experts)
    rows = x.index_select(0, tokens)
    if impl in ("auto", "grouped_mm") and grouped_mm_applicable(rows, *weights) is not None:
        impl = "loop" if impl == "auto" else impl
    if impl == "auto":
        impl = choose_impl(rows.shape[0], num_experts, int(counts.max()), rows.dtype, True)
    if impl == "grouped_mm":
        weights = _aligned(weights, rows)
    gate, up, down = weights
    ops = _BACKENDS[impl](counts, rows.shape[0])
    xs = ops.enter(rows)
    act = _activate(ops.linear(xs, gate), ops.linear(xs, up) if up is not None else None)
    act.mul_(ops.matmul(ops.enter(grad_y.index_select(0, tokens).to(x.dtype)), down))  # u_i * a_i
    out[tokens, experts] = ops.exit(act.sum(-1, keepdim=True)).squeeze(1)
    return out


def map_weights(fn: Callable[[Tensor], Tensor], weights: tuple) -> tuple:
    """``fn`` applied to every tensor of an experts module's weights named tuple (an
    :class:`ExpertWeights` or the module's own), None entries kept: the same named tuple type.
    E.g. ``map_weights(Tensor.detach, experts.stacked_weights())``."""
    return rebuild_weights(type(weights), [None if w is None else fn(w) for w in weights])


def _aligned(weights: ExpertWeights, rows: Tensor) -> ExpertWeights:
    """The weights grouped_mm cannot read through their strides made contiguous."""
    return map_weights(lambda w: w if grouped_mm_applicable(rows, w) is None else w.contiguous(), weights)


# ----------------------------------------------------------------------------- the module
class Experts(nn.Module):
    """E feed-forward experts with stacked weights.

    ``forward(rows [N, D], counts [E]) -> [N, D]`` runs expert e on its ``counts[e]``
    consecutive rows through :func:`grouped_mlp` with this module's ``impl``.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, activation: str = "swiglu",
                 impl: str = "auto") -> None:
        super().__init__()
        check_int("dim", dim, 1)
        check_int("hidden_dim", hidden_dim, 1)
        check_int("num_experts", num_experts, 1)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("impl", impl, IMPLS)
        self.dim, self.hidden_dim, self.num_experts, self.activation = dim, hidden_dim, num_experts, activation
        self.impl = impl
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim)) if activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear's default bound."""
        for w, fan_in in ((self.w1, self.dim), (self.w3, self.dim), (self.w2, self.hidden_dim)):
            if w is not None:
                nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
                f"activation={self.activation}, impl={self.impl}")

    def stacked_weights(self) -> ExpertWeights:
        """ExpertWeights(gate=w1 [E, H, D], up=w3 [E, H, D] or None for GELU, down=w2 [E, D, H])."""
        return ExpertWeights(gate=self.w1, down=self.w2, up=self.w3)

    def forward(self, rows: Tensor, counts: Tensor, padded: bool = False) -> Tensor:
        """rows [N, D] grouped by expert, counts [E] int -> [N, D] expert outputs (``padded``:
        counts sum to M <= N, rows M.. are padding with zero output, see :func:`grouped_mlp`)."""
        return grouped_mlp(rows, counts, self.w1, self.w2, self.w3, self.activation, self.impl, padded)

    def unselected_inner_products(self, x: Tensor, grad_y: Tensor, indices: Tensor,
                                  weights: ExpertWeights) -> Tensor:
        """[t, E] <g_t, E_i(x_t)> for the unselected experts (see :func:`unselected_inner_products`);
        ``weights`` are this module's :meth:`stacked_weights` (possibly detached)."""
        return unselected_inner_products(x, grad_y, indices, weights, self.impl)

    def every_expert(self, x: Tensor, weights: ExpertWeights) -> Tensor:
        """All experts on all tokens: x [t, D] -> [t, E, D] (used by the ``dense`` estimator).

        ``weights`` are this module's :meth:`stacked_weights` (possibly detached or cast).
        """
        gate_x = torch.einsum("td,ehd->teh", x, weights.gate)
        up_x = torch.einsum("td,ehd->teh", x, weights.up) if weights.up is not None else None
        return torch.einsum("teh,edh->ted", _activate(gate_x, up_x), weights.down)
