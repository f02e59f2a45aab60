"""Expert backends and the MoE layer against per-token reference loops (float64 where possible)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import moegrad
from moegrad.experts import IMPLS, choose_impl, grouped_mlp
from tests.conftest import capacity_keep_ref, moe_loop_ref

BACKENDS = [i for i in IMPLS if i != "auto"]


def _dtype(impl):
    return torch.float32 if impl == "grouped_mm" else torch.float64


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def _mlp_ref(rows, counts, w1, w2, w3, activation):
    """Row by row: w2_e act(w1_e x, w3_e x) with e the row's group."""
    groups = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    out = []
    for r in range(rows.shape[0]):
        e, x = int(groups[r]), rows[r]
        h = F.silu(w1[e] @ x) * (w3[e] @ x) if activation == "swiglu" else F.gelu(w1[e] @ x)
        out.append(w2[e] @ h)
    return torch.stack(out) if out else rows.new_zeros(0, rows.shape[1])


def _weights(e, h, d, dtype, gen, fused=False):
    w2 = torch.randn(e, d, h, generator=gen, dtype=dtype) / h ** 0.5
    if fused:  # HF layout: gate_up [E, 2H, D], w1 and w3 are non-contiguous slices of it
        gate_up = (torch.randn(e, 2 * h, d, generator=gen, dtype=dtype) / d ** 0.5).requires_grad_()
        return gate_up, w2.requires_grad_()
    w1 = torch.randn(e, h, d, generator=gen, dtype=dtype) / d ** 0.5
    w3 = torch.randn(e, h, d, generator=gen, dtype=dtype) / d ** 0.5
    return w1.requires_grad_(), w2.requires_grad_(), w3.requires_grad_()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [1], [0, 0, 1], [0, 0, 0], [7, 7, 7, 7, 7, 7]])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_mlp_matches_reference(impl, counts, activation):
    dtype = _dtype(impl)
    gen = torch.Generator().manual_seed(len(counts) * 7 + sum(counts))
    d, h, e = 8, 12, len(counts)
    w1, w2, w3 = _weights(e, h, d, dtype, gen)
    w3 = w3 if activation == "swiglu" else None
    counts_t = torch.tensor(counts)
    rows = torch.randn(sum(counts), d, generator=gen, dtype=dtype, requires_grad=True)
    out = grouped_mlp(rows, counts_t, w1, w2, w3, activation, impl)
    leaves = [t for t in (rows, w1, w2, w3) if t is not None]
    ref = _mlp_ref(rows, counts_t, w1, w2, w3, activation)
    torch.testing.assert_close(out, ref, **_tol(dtype))
    g = torch.randn(out.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad((out * g).sum(), leaves, allow_unused=True)
    if ref.requires_grad:
        refs = torch.autograd.grad((ref * g).sum(), leaves, allow_unused=True)
    else:  # no rows at all: every gradient is zero
        refs = [torch.zeros_like(t) for t in leaves]
    for name, a, b in zip(("rows", "w1", "w2", "w3"), grads, refs):
        a = torch.zeros_like(leaves[0 if name == "rows" else 1]) if a is None and b is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, **_tol(dtype), msg=lambda m: f"{impl} d{name}: {m}")


@pytest.mark.parametrize("impl", ["loop", "bmm"])
def test_gradcheck_float64(impl):
    gen = torch.Generator().manual_seed(2)
    w1, w2, w3 = _weights(3, 4, 3, torch.float64, gen)
    counts = torch.tensor([2, 0, 3])
    rows = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda r, a, b, c: grouped_mlp(r, counts, a, b, c, impl=impl), (rows, w1, w2, w3))


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_gate_up_views(impl):
    """HF's fused gate_up [E, 2H, D]: w1/w3 are strided slices; gradients reach the fused tensor."""
    dtype = _dtype(impl)
    gen = torch.Generator().manual_seed(3)
    e, h, d = 4, 8, 8
    gate_up, w2 = _weights(e, h, d, dtype, gen, fused=True)
    counts = torch.tensor([2, 5, 0, 3])
    rows = torch.randn(10, d, generator=gen, dtype=dtype)
    out = grouped_mlp(rows, counts, gate_up[:, :h], w2, gate_up[:, h:], impl=impl)
    ref = _mlp_ref(rows, counts, gate_up[:, :h], w2, gate_up[:, h:], "swiglu")
    torch.testing.assert_close(out, ref, **_tol(dtype))
    (a,) = torch.autograd.grad(out.square().sum(), gate_up)
    (b,) = torch.autograd.grad(ref.square().sum(), gate_up)
    torch.testing.assert_close(a, b, **_tol(dtype))
    # a transposed (non-contiguous) w2 view gives the same result
    w2t = w2.detach().transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(grouped_mlp(rows, counts, gate_up[:, :h], w2t, gate_up[:, h:], impl=impl),
                               out, **_tol(dtype))


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("t,e,k,cap", [(13, 5, 2, None), (1, 4, 2, None), (9, 1, 1, None),
                                       (8, 3, 3, None), (20, 6, 2, 0.5), (6, 8, 2, None)])
def test_moe_layer_matches_token_loop(impl, t, e, k, cap):
    """Outputs and every gradient (input, router gate, experts) vs the per-token loop."""
    dtype = _dtype(impl)
    torch.manual_seed(t + e + k)
    moe = moegrad.MoE(8, 16, e, k, impl=impl, losses={}, capacity_factor=cap).to(dtype)
    x = torch.randn(t, 8, dtype=dtype, requires_grad=True)
    out = moe(x)
    routing = moe.router(x)
    keep = torch.ones_like(routing.weights)
    if cap is not None:  # drop each expert's lowest-weight pairs over capacity, by hand
        from moegrad.dispatch import expert_capacity
        capacity = expert_capacity(cap, t, k, e)
        assert capacity == math.ceil(cap * t * k / e)
        keep = capacity_keep_ref(routing.indices, routing.weights, e, capacity).to(keep.dtype)
        routed = torch.bincount(routing.indices.view(-1), minlength=e)
        assert int(out.stats.dropped) == int((routed - expert_capacity(cap, t, k, e)).clamp(min=0).sum()) > 0
    else:
        assert int(out.stats.dropped) == 0
    routing.weights = routing.weights * keep
    ref = moe_loop_ref(x, moe, routing)
    torch.testing.assert_close(out.y, ref, **_tol(dtype))
    g = torch.randn(out.y.shape, dtype=dtype)
    params = [x] + list(moe.parameters())
    a = torch.autograd.grad((out.y * g).sum(), params, allow_unused=True)
    b = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    for p, ga, gb in zip(params, a, b):
        ga = torch.zeros_like(p) if ga is None else ga
        gb = torch.zeros_like(p) if gb is None else gb
        torch.testing.assert_close(ga, gb, **_tol(dtype))


def test_all_impls_agree_and_are_deterministic():
    torch.manual_seed(0)
    moe = moegrad.MoE(16, 32, 8, 2, losses={})
    x = torch.randn(64, 16)
    results = {}
    for impl in list(IMPLS) + ["loop"]:
        moe.experts.impl = impl
        xx = x.clone().requires_grad_()
        moe.zero_grad()
        y = moe(xx).y
        y.square().sum().backward()
        res = [y.detach(), xx.grad] + [p.grad.clone() for p in moe.parameters()]
        if impl in results:  # a second run of the same impl is bitwise identical
            assert all(torch.equal(u, v) for u, v in zip(results[impl], res))
        results[impl] = res
    for impl in IMPLS:
        for u, v in zip(results[impl], results["loop"]):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


def test_choose_impl_rule():
    assert choose_impl(0, 8, 0, torch.float32, True) == "loop"
    assert choose_impl(2048, 128, 24, torch.float32, True) == "bmm"      # tiny, balanced groups
    assert choose_impl(2048, 128, 40, torch.float32, True) == "grouped_mm"  # padding > 2x
    assert choose_impl(8192, 128, 80, torch.float32, True) == "grouped_mm"  # 64 rows per expert
    assert choose_impl(8192, 8, 1100, torch.float32, True) == "loop"  # large groups
    assert choose_impl(8192, 8, 1100, torch.float64, False) == "loop"
    assert choose_impl(2048, 128, 24, torch.float64, False) == "bmm"


def test_bad_arguments():
    gen = torch.Generator().manual_seed(0)
    w1, w2, w3 = _weights(2, 6, 4, torch.float64, gen)
    rows = torch.randn(3, 4, dtype=torch.float64)
    counts = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="impl='grouped_mm' cannot run here"):
        grouped_mlp(rows, counts, w1, w2, w3, impl="grouped_mm")
    with pytest.raises(ValueError, match="impl='fast' is not supported"):
        grouped_mlp(rows, counts, w1, w2, w3, impl="fast")
    with pytest.raises(ValueError, match="sum to the N=3 rows"):
        grouped_mlp(rows, torch.tensor([1, 1]), w1, w2, w3)
    with pytest.raises(ValueError, match="needs w3"):
        grouped_mlp(rows, counts, w1, w2)
    with pytest.raises(ValueError, match="takes no w3"):
        grouped_mlp(rows, counts, w1, w2, w3, activation="gelu")
    with pytest.raises(ValueError, match="w2 must be"):
        grouped_mlp(rows, counts, w1, w1, w3)
    with pytest.raises(TypeError, match="dtype"):
        grouped_mlp(rows.float(), counts, w1.float(), w2, w3.float())
    with pytest.raises(ValueError, match="16 bytes"):
        w = torch.randn(2, 4, 5)
        grouped_mlp(torch.randn(3, 5), counts, w, torch.randn(2, 5, 4), w, impl="grouped_mm")
    # auto falls back where grouped_mm cannot run (fp64 here)
    out = grouped_mlp(rows, counts, w1, w2, w3, impl="auto")
    torch.testing.assert_close(out, _mlp_ref(rows, counts, w1, w2, w3, "swiglu"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("t,e,k", [(11, 5, 2), (1, 4, 1), (6, 3, 3), (0, 4, 2)])
def test_unselected_inner_products_match_every_expert_reference(impl, activation, t, e, k):
    """The dense estimator's backward product <g_t, E_i(x_t)> for i not selected, 0 otherwise."""
    from tests.conftest import every_expert_ref

    dtype = _dtype(impl)
    moe = moegrad.MoE(8, 16, e, k, activation=activation, impl=impl).to(dtype)
    x, g = torch.randn(t, 8, dtype=dtype), torch.randn(t, 8, dtype=dtype)
    indices = torch.rand(t, e).topk(k, -1).indices
    got = moe.experts.unselected_inner_products(x, g, indices, moe.experts.stacked_weights())
    want = torch.einsum("ted,td->te", every_expert_ref(x, moe), g)
    want = want.scatter(1, indices, 0.0)
    torch.testing.assert_close(got, want.detach(), **_tol(dtype))
    assert got.shape == (t, e) and not got.requires_grad


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_stacked_weights_are_named_by_role_in_the_former_tuple_order(activation):
    """ExpertWeights(gate=w1, up=w3, down=w2): a former ``w1, w3, w2 = stacked_weights()`` still
    unpacks right for SwiGLU; GELU has up=None (a 2-name unpack fails loudly)."""
    experts = moegrad.Experts(4, 6, 3, activation)
    weights = experts.stacked_weights()
    assert weights.gate is experts.w1 and weights.down is experts.w2 and weights.up is experts.w3
    assert weights.activation == activation
    w1, w3, w2 = weights
    assert w1 is experts.w1 and w3 is experts.w3 and w2 is experts.w2
    if activation == "gelu":
        assert w3 is None
        with pytest.raises(ValueError, match="too many values"):
            w1, w2 = weights
