"""The failure the MLX issue ml-explore/mlx#652 describes and the fix: with top-1 and renormalised weights, ``topk``
(and mlx-lm's stop_gradient routing) gives the router exactly zero task gradient; ``dense``
gives it the exact dense straight-through gradient, checked against an independent reference
that evaluates every expert, while expert weights and input keep ``topk``'s gradients."""

from __future__ import annotations

import pytest

from tests.mlx import need  # noqa: E402

mx = need("mlx.core")

import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from moegrad import mlx as mgx  # noqa: E402
from tests.mlx.mlx_helpers import max_diff, mlx_grads  # noqa: E402

TOL = 1e-4


def expert(moe, e, x):
    """Expert e written from the weights: w2 (silu(w1 x) * (w3 x)), x [T, D]."""
    ex = moe.experts
    return (nn.silu(x @ ex.w1[e].T) * (x @ ex.w3[e].T)) @ ex.w2[e].T


def reference_gate_grad(moe, x, weight):
    """dL/dW_gate of L = sum(y * weight) with y = sum_S w_i e_i + sum_{i not in S}(s_i - sg s_i) e_i / n,
    n = 1, or n = sg(sum_S s) with renormalised weights (DenseMixer's weight for the unselected
    experts), every expert evaluated on every token, differentiated by plain autograd."""
    num_experts = moe.num_experts
    chosen = np.array(moe.router(x).indices)
    picked = mx.array((chosen[..., None] == np.arange(num_experts)).any(1).astype(np.float32))
    outs = mx.stop_gradient(mx.stack([expert(moe, e, x) for e in range(num_experts)], 1))  # [T,E,D]
    normalize = moe.router.config.normalize

    def loss(w_gate):
        s = mx.softmax(x @ w_gate.T, axis=-1)
        w = s * picked
        extra = (s - mx.stop_gradient(s)) * (1 - picked)
        if normalize:
            extra = extra / mx.stop_gradient(w.sum(-1, keepdims=True))
            w = w / w.sum(-1, keepdims=True)
        y = ((w + extra)[..., None] * outs).sum(1)
        return (y * weight).sum()

    return mx.grad(loss)(moe.router.gate.weight)


def pair(estimator, top_k, normalize, **options):
    mx.random.seed(0)
    a = mgx.MoE(12, 20, 5, top_k, normalize=normalize, estimator="topk", losses={})
    b = mgx.MoE(12, 20, 5, top_k, normalize=normalize, estimator=estimator, losses={}, **options)
    b.update(a.parameters())
    return a, b


def test_top1_normalized_topk_gives_the_router_nothing():
    a, _ = pair("topk", 1, True)
    x, weight = mx.random.normal((32, 12)), mx.random.normal((32, 12))
    g = mlx_grads(a, x, weight)
    assert np.all(np.array(g["out"].routing.weights) == 1.0)
    # zero up to the rounding of s / (s + 1e-20): about 1e-7 against the 1e-2 of dense below
    assert float(mx.abs(g["router.gate.weight"]).max()) < 1e-6
    assert float(mx.abs(g["experts.w1"]).max()) > 1e-3  # the experts still learn


def test_seed_002_stop_gradient_routing_also_gives_nothing():
    """Seed 002's pattern as mlx-lm's Mixtral block writes it: stop_gradient(argpartition), then
    the combine weights are the softmax of the selected logits; with top-1 that is exactly 1."""
    mx.random.seed(1)
    gate = nn.Linear(8, 4, bias=False)
    w = mx.random.normal((4, 8, 8))
    x, weight = mx.random.normal((16, 8)), mx.random.normal((16, 8))

    def loss(g_w):
        logits = x @ g_w.T
        idx = mx.stop_gradient(mx.argpartition(-logits, 0, -1)[..., :1])  # [T, 1]
        gw = mx.softmax(mx.take_along_axis(logits, idx, -1), -1)
        y = (x[:, None, None, :] @ w[idx].swapaxes(-1, -2))[:, :, 0, :]  # [T, 1, D]
        return ((y * gw[..., None]).sum(1) * weight).sum()

    assert float(mx.abs(mx.grad(loss)(gate.weight)).max()) == 0.0
    with pytest.raises(ValueError, match="stop_gradient"):  # without it MLX refuses outright
        mx.grad(lambda v: mx.take_along_axis(v, mx.argpartition(-v, 0, -1)[..., :1], -1).sum())(x)


@pytest.mark.parametrize("top_k,normalize", [(1, True), (2, False), (2, True)])
def test_dense_gives_the_exact_dense_gradient(top_k, normalize):
    a, b = pair("dense", top_k, normalize)
    x, weight = mx.random.normal((40, 12)), mx.random.normal((40, 12))
    ga, gb = mlx_grads(a, x, weight), mlx_grads(b, x, weight)
    ref = reference_gate_grad(b, x, weight)
    assert float(mx.abs(gb["router.gate.weight"]).max()) > 1e-3
    assert max_diff(gb["router.gate.weight"], ref) < TOL
    assert max_diff(gb["y"], ga["y"]) == 0  # same forward as topk
    # the unselected experts send nothing to the expert weights (the input's gradient differs
    # through the router logits only; it is compared with torch's in test_mlx_parity)
    for key in ("experts.w1", "experts.w2", "experts.w3"):
        assert max_diff(gb[key], ga[key]) < 1e-6, key


def test_dense_chunking_changes_nothing():
    _, b = pair("dense", 2, False)
    _, c = pair("dense", 2, False, chunk_tokens=3)
    x, weight = mx.random.normal((40, 12)), mx.random.normal((40, 12))
    gb, gc = mlx_grads(b, x, weight), mlx_grads(c, x, weight)
    assert max_diff(gb["router.gate.weight"], gc["router.gate.weight"]) < 1e-6
    with pytest.raises(ValueError, match="chunk_tokens"):
        mgx.MoE(12, 20, 5, 2, estimator="dense", chunk_tokens=0)


def test_straight_through_and_default_moe_also_train_top1():
    for estimator in ("straight_through", "default_moe"):
        _, b = pair(estimator, 1, True)
        x, weight = mx.random.normal((32, 12)), mx.random.normal((32, 12))
        b(x)  # default_moe: fill the defaults once
        g = mlx_grads(b, x, weight)
        assert float(mx.abs(g["router.gate.weight"]).max()) > 1e-4, estimator


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("forward_defaults", [False, True])
def test_default_moe_gradient_and_output_from_the_defaults(normalize, forward_defaults):
    """default_moe with fixed defaults ebar against autograd of the explicit layer
    y = sum_S w_i e_i + c sum_{i not in S} s_i / n ebar_i (straight-through unless
    forward_defaults), n = 1 or, renormalised, n = sg(sum_S s) (the weight dense uses)."""
    mx.random.seed(3)
    moe = mgx.MoE(12, 20, 5, 2, normalize=normalize, estimator="default_moe", losses={},
                  routed_scaling_factor=1.5, forward_defaults=forward_defaults)
    ebar = mx.random.normal((5, 12))
    moe.router.estimator.defaults = ebar
    moe.eval()  # keep the defaults fixed
    x, weight = mx.random.normal((24, 12)), mx.random.normal((24, 12))
    got = mlx_grads(moe, x, weight)
    chosen = np.array(moe.router(x).indices)
    picked = mx.array((chosen[..., None] == np.arange(5)).any(1).astype(np.float32))
    outs = mx.stack([expert(moe, e, x) for e in range(5)], 1)  # [T, E, D]

    def layer(w_gate):
        s = mx.softmax(x @ w_gate.T, axis=-1)
        w = s * picked
        n = mx.stop_gradient(w.sum(-1, keepdims=True)) if normalize else 1.0
        if normalize:
            w = w / w.sum(-1, keepdims=True)
        y = 1.5 * (w[..., None] * outs).sum(1)
        m = 1.5 * (s * (1 - picked) / n) @ ebar
        return y + (m if forward_defaults else m - mx.stop_gradient(m))

    want = mx.grad(lambda w_gate: (layer(w_gate) * weight).sum())(moe.router.gate.weight)
    assert max_diff(got["y"], layer(moe.router.gate.weight)) < TOL
    assert float(mx.abs(want).max()) > 1e-3
    assert max_diff(got["router.gate.weight"], want) < TOL
