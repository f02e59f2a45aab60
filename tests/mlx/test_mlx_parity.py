"""Parity of moegrad.mlx with the PyTorch side for the deterministic estimators: outputs, aux
losses and the gradients of input, router gate and expert weights agree within 1e-4 (float32)."""

from __future__ import annotations

import pytest

from tests.mlx import need  # noqa: E402

mx = need("mlx.core")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import moegrad  # noqa: E402
from moegrad import mlx as mgx  # noqa: E402
from tests.mlx.mlx_helpers import max_diff, mlx_grads, to_mx, torch_grads  # noqa: E402

TOL = 1e-4
DETERMINISTIC = ["topk", "unweighted", "straight_through", "dense", "default_moe"]
# (name, MoE kwargs, input shape)
CONFIGS = [
    ("top2", dict(), (24, 16)),
    ("top1-normalized", dict(top_k=1, normalize=True), (24, 16)),
    ("sigmoid-scaled", dict(score="sigmoid", normalize=True, routed_scaling_factor=2.5,
                            temperature=0.7), (3, 8, 16)),
    ("grouped-bias", dict(num_experts=8, top_k=3, n_group=4, topk_group=2, selection_bias=True,
                          losses={"switch": 1e-2, "seq_aux": 1e-2, "z_loss": 1e-3}), (2, 12, 16)),
    ("gelu-capacity", dict(activation="gelu", capacity_factor=0.75), (24, 16)),
]


@pytest.fixture(autouse=True)
def _seeded():
    """Each test draws the same weights and inputs whatever ran before it."""
    torch.manual_seed(0)


def build(estimator: str, kwargs: dict):
    base = dict(dim=16, hidden_dim=24, num_experts=6, top_k=2)
    base.update(kwargs)
    dim, hidden, experts, k = (base.pop(n) for n in ("dim", "hidden_dim", "num_experts", "top_k"))
    tm = moegrad.MoE(dim, hidden, experts, k, estimator=estimator, **base)
    if tm.router.bias is not None:
        with torch.no_grad():
            tm.router.bias.copy_(torch.randn(experts) * 0.05)
    return tm


def compare(tm, shape, mask=None):
    mm = mgx.from_torch(tm)
    x = torch.randn(*shape)
    weight = torch.randn(*shape)
    tmask = None if mask is None else torch.as_tensor(mask)
    t = torch_grads(tm, x, weight, tmask)
    m = mlx_grads(mm, to_mx(x), to_mx(weight), None if mask is None else mx.array(mask))
    assert np.array_equal(np.array(m["out"].routing.indices), t["out"].routing.indices.numpy())
    assert max_diff(m["y"], t["y"]) < TOL
    assert max_diff(m["loss"], t["loss"]) < TOL
    assert max_diff(m["x"], t["x"]) < TOL
    names = {"router.gate.weight", "experts.w1", "experts.w2", "experts.w3"}
    for name in names & set(t):
        assert t[name] is not None, name
        assert max_diff(m[name], t[name]) < TOL, name
    assert max_diff(m["out"].stats.tokens_per_expert, t["out"].stats.tokens_per_expert) == 0
    assert int(m["out"].stats.dropped) == int(t["out"].stats.dropped)
    t["inputs"] = (x, weight)
    return mm, m, t


@pytest.mark.parametrize("estimator", DETERMINISTIC)
@pytest.mark.parametrize("name,kwargs,shape", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_outputs_and_gradients_match_torch(estimator, name, kwargs, shape):
    tm = build(estimator, kwargs)
    mm, m, t = compare(tm, shape)
    # training-mode state moved the same way
    assert max_diff(mm.router.load_counts, tm.router.load_counts) == 0
    if kwargs.get("capacity_factor"):
        assert int(t["out"].stats.dropped) > 0  # the config really drops pairs


def test_padding_mask_matches_torch():
    tm = build("dense", dict(losses={"switch": 1e-2, "seq_aux": 1e-2, "z_loss": 1e-3}))
    mask = np.ones((3, 8), dtype=bool)
    mask[0, 5:] = False
    mask[2, :] = False
    mm, m, t = compare(tm, (3, 8, 16), mask)
    assert max_diff(mm.router.load_counts, tm.router.load_counts) == 0
    assert int(mm.router.load_counts.sum()) == 13 * 2


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("forward_defaults", [False, True])
def test_default_moe_with_the_same_buffers(forward_defaults, normalize):
    torch.manual_seed(1)
    tm = build("default_moe", dict(forward_defaults=forward_defaults, beta=0.7, normalize=normalize))
    for _ in range(2):  # fill the EMA defaults on the torch side (no experts left unseen here)
        tm(torch.randn(32, 16))
    assert float(tm.router.estimator.defaults.abs().sum()) > 0
    mm, m, t = compare(tm, (24, 16))
    est_m, est_t = mm.router.estimator, tm.router.estimator
    assert max_diff(est_m.defaults, est_t.defaults) < 1e-5  # updated by the same observation
    assert np.array_equal(np.array(est_m.seen), est_t.seen.numpy())
    # the defaults reach the router: on the same input and loss, its gradient differs from
    # plain topk's by the <g, ebar_i> terms of the unselected experts
    ref = build("topk", dict(normalize=normalize))
    ref.load_state_dict({k: v for k, v in tm.state_dict().items() if "estimator" not in k})
    plain = torch_grads(ref, *t["inputs"])
    if not forward_defaults:  # the same forward as topk
        torch.testing.assert_close(plain["y"], t["y"])
    gap = max_diff(t["router.gate.weight"], plain["router.gate.weight"])
    assert gap > 1e-3 * float(plain["router.gate.weight"].abs().max())


def test_bfloat16_input_goes_through_float32():
    tm = build("dense", {})
    mm = mgx.from_torch(tm)
    x = torch.randn(10, 16)
    out = mm(to_mx(x).astype(mx.bfloat16))
    assert out.y.dtype == mx.bfloat16
    ref = tm(x.bfloat16().float()).y
    assert max_diff(out.y, ref) < 5e-2


@pytest.mark.parametrize("estimator", DETERMINISTIC + ["gumbel", "noisy_topk", "sparsemixer"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_no_tokens_gives_empty_outputs_and_zero_gradients(estimator, capacity_factor):
    mm = mgx.MoE(8, 12, 4, 2, estimator=estimator, capacity_factor=capacity_factor,
                 losses={"switch": 1e-2, "z_loss": 1e-3, "seq_aux": 1e-2})
    m = mlx_grads(mm, mx.zeros((0, 8)), mx.zeros((0, 8)))
    assert m["y"].shape == (0, 8) and float(m["loss"]) == 0.0
    assert float(mx.abs(m["router.gate.weight"]).sum()) == 0.0
    assert float(mx.abs(m["experts.w1"]).sum()) == 0.0


@pytest.mark.parametrize("estimator", DETERMINISTIC)
@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (4, 4)])
def test_one_expert_and_k_equals_e_match_torch(estimator, num_experts, top_k):
    """compare() asserts outputs and gradients within 1e-4; here k = E, so every token uses
    every expert."""
    _, m, _ = compare(build(estimator, dict(num_experts=num_experts, top_k=top_k)), (9, 16))
    picked = np.sort(np.array(m["out"].routing.indices), axis=1)
    assert (picked == np.arange(num_experts)).all()


@pytest.mark.parametrize("kwargs,shape,mask", [
    (dict(routing="expert_choice", losses={}), (24, 16), None),
    (dict(routing="expert_choice", capacity_factor=1.5, score="sigmoid", routed_scaling_factor=2.0,
          losses={"z_loss": 1e-3}), (2, 12, 16), None),
    (dict(routing="expert_choice", num_experts=4, top_k=1, capacity_factor=0.5, losses={}), (2, 9, 16),
     np.array([[True] * 7 + [False] * 2, [True] * 4 + [False] * 5])),
], ids=["default", "sigmoid-scaled-cf1.5-zloss", "padding-cf0.5"])
def test_expert_choice_matches_torch(kwargs, shape, mask):
    """routing='expert_choice': the same chosen pairs, outputs, gradients and stats in both
    frameworks (training and eval select alike)."""
    tm = build("topk", kwargs)
    mm, m, t = compare(tm, shape, mask)
    assert np.array_equal(np.array(m["out"].routing.chosen), t["out"].routing.chosen.numpy())
    assert int(m["out"].stats.unrouted_tokens) == int(t["out"].stats.unrouted_tokens)
    assert max_diff(mm.router.load_counts, tm.router.load_counts) == 0
    tpe = t["out"].stats.tokens_per_expert
    assert (tpe == tpe[0]).all() and int(t["out"].stats.dropped) == 0
