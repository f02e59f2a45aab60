"""moegrad.mlx.selection: the Selection the router hands to its estimator (config + selection
bias) selects and weighs exactly as the router's own methods, and a user's estimator reads it."""

from __future__ import annotations

import numpy as np
import pytest

from tests.mlx import need

mx = need("mlx.core")

from moegrad import mlx as mgx  # noqa: E402
from moegrad._spec import RouterConfig  # noqa: E402
from moegrad.mlx.estimators import Estimator, Picked  # noqa: E402
from moegrad.mlx.selection import Selection, sinkhorn  # noqa: E402


def test_selection_adds_the_bias_groups_and_weighs_like_the_router():
    router = mgx.Router(4, 6, 2, normalize=True, routed_scaling_factor=2.0, n_group=3,
                        topk_group=2, selection_bias=True)
    router.bias = mx.array([0.0, 0.0, 0.0, 0.0, 0.5, 0.0])
    scores = mx.array([[0.30, 0.25, 0.20, 0.15, 0.05, 0.05],
                       [0.05, 0.10, 0.40, 0.05, 0.20, 0.20]])
    sel = router.selection()
    assert sel.config is router.config and sel.bias is router.bias
    # groups {0,1} {2,3} {4,5}, biased group sums: row 0 0.55, 0.35, 0.60 -> groups 0 and 2;
    # row 1 0.15, 0.45, 0.90 -> groups 1 and 2; then the top-2 biased scores inside them
    assert np.array(sel.select_topk(scores)).tolist() == [[4, 0], [4, 2]]
    assert np.array(router.select_topk(scores)).tolist() == [[4, 0], [4, 2]]
    w = sel.combine_weights(scores, sel.select_topk(scores))  # c * s / sum_S s, unbiased s
    assert np.allclose(np.array(w), [[2 * 0.05 / 0.35, 2 * 0.30 / 0.35],
                                     [2 * 0.20 / 0.60, 2 * 0.40 / 0.60]], atol=1e-6)
    plain = Selection(RouterConfig(4, 6, 2))
    assert np.array(plain.select_topk(scores)).tolist() == [[0, 1], [2, 4]]
    assert np.allclose(np.array(plain.combine_weights(scores, plain.select_topk(scores))),
                       [[0.30, 0.25], [0.40, 0.20]], atol=1e-7)


class HalfTopK(Estimator):
    """A user's estimator: top-k through the Selection's own names, half weights."""

    name = "half_topk"

    def route(self, x, z, scores, selection) -> Picked:
        indices = selection.select_topk(scores)
        c = selection.config.routed_scaling_factor
        return Picked(indices, 0.5 * c * selection.combine_weights(scores, indices) / c)


def test_a_users_estimator_routes_through_the_selection():
    router = mgx.Router(4, 5, 2)
    router.estimator = HalfTopK(router.config)
    x = mx.random.normal((7, 4), key=mx.random.key(0))
    r = router(x)
    s = np.array(r.scores)
    ref = np.argsort(-s, axis=1, kind="stable")[:, :2]
    assert np.array(r.indices).tolist() == ref.tolist()
    assert np.allclose(np.array(r.weights), 0.5 * np.take_along_axis(s, ref, 1), atol=1e-7)


# ----------------------------------------------------------------------------- Sinkhorn selection
def _balanced(scores, tol=1e-4, max_iters=1000):
    """Sinkhorn in NumPy float64, as alternating normalisation of the matrix: rows to 1/T,
    columns to 1/E, until the mean change of the accumulated column factors is <= tol."""
    p = np.array(scores, dtype=np.float64)
    t, e = p.shape
    cols = np.ones(e)
    for _ in range(max_iters):
        p = p / p.sum(1, keepdims=True) / t
        factor = 1.0 / (e * p.sum(0))
        p = p * factor
        change = np.abs(cols * factor - cols).mean()
        cols = cols * factor
        if change <= tol:
            break
    return p


def _skewed(t=64, e=8, seed=0):
    z = np.random.default_rng(seed).standard_normal((t, e)).astype(np.float32)
    z[:, :2] += 2.0
    return z


def test_mlx_sinkhorn_is_doubly_stochastic_and_equals_the_written_out_normalisation():
    z = _skewed()
    s = mx.softmax(mx.array(z), axis=-1)
    p = np.array(sinkhorn(s))
    t, e = z.shape
    assert np.allclose(p.sum(0), 1 / e, rtol=1e-5, atol=0)
    assert np.abs(p.sum(1) * t - 1).max() < 0.02
    assert np.allclose(p, _balanced(np.array(s)), rtol=1e-4, atol=1e-9)
    assert sinkhorn(mx.zeros((0, 4))).shape == (0, 4)


def test_mlx_sinkhorn_router_selects_balanced_top_k_in_training_and_plain_top_k_in_eval():
    z = _skewed(seed=1)
    router = mgx.Router(4, 8, 2, routing="sinkhorn", normalize=True, routed_scaling_factor=2.0)
    s = mx.softmax(mx.array(z), axis=-1)
    sel = router.selection()
    assert sel.training is True
    got = np.array(sel.select_topk(s))
    expect = np.argsort(-_balanced(np.array(s)), axis=1, kind="stable")[:, :2]
    assert got.tolist() == expect.tolist()
    plain = np.argsort(-np.array(s), axis=1, kind="stable")[:, :2]
    assert got.tolist() != plain.tolist()
    w = np.take_along_axis(np.array(s), got, 1)
    assert np.allclose(np.array(sel.combine_weights(s, sel.select_topk(s))),
                       2.0 * w / w.sum(1, keepdims=True), atol=1e-6)
    router.eval()
    assert np.array(router.selection().select_topk(s)).tolist() == plain.tolist()


def test_torch_and_mlx_sinkhorn_agree_on_the_same_logits():
    import torch

    import moegrad
    from moegrad.mlx.convert import from_torch
    from moegrad.selection import sinkhorn as torch_sinkhorn

    z = _skewed(seed=2)
    pt = torch_sinkhorn(torch.softmax(torch.from_numpy(z), -1)).numpy()
    pm = np.array(sinkhorn(mx.softmax(mx.array(z), axis=-1, precise=True)))
    assert np.allclose(pt, pm, rtol=1e-4, atol=1e-9)
    torch.manual_seed(0)
    tmoe = moegrad.MoE(8, 16, 4, 2, routing="sinkhorn", estimator="straight_through")
    mmoe = from_torch(tmoe)
    assert mmoe.router.config.routing == "sinkhorn"
    x = np.random.default_rng(3).standard_normal((48, 8)).astype(np.float32)
    tout, mout = tmoe(torch.from_numpy(x)), mmoe(mx.array(x))
    assert np.array(mout.routing.indices).astype(np.int64).tolist() == tout.routing.indices.tolist()
    assert np.allclose(np.array(mout.y), tout.y.detach().numpy(), atol=1e-5)


def test_mlx_moe_with_sinkhorn_trains_for_each_deterministic_estimator_and_refuses_sampling():
    import mlx.nn as nn

    x = mx.random.normal((32, 8), key=mx.random.key(0))
    for estimator in ("topk", "unweighted", "straight_through", "dense", "default_moe"):
        moe = mgx.MoE(8, 16, 4, 2, routing="sinkhorn", estimator=estimator)
        out = moe(x)
        s = np.array(out.routing.scores)
        expect = np.argsort(-_balanced(s), axis=1, kind="stable")[:, :2]
        assert np.array(out.routing.indices).tolist() == expect.tolist(), estimator

        def loss(model):
            o = model(x)
            return (o.y ** 2).mean() + o.aux_loss

        _, grads = nn.value_and_grad(moe, loss)(moe)
        g = np.array(grads["router"]["gate"]["weight"])
        assert np.isfinite(g).all() and np.abs(g).sum() > 0, estimator
    for estimator in ("gumbel", "noisy_topk", "sparsemixer"):
        with pytest.raises(ValueError, match="samples its selection.*routing='sinkhorn'"):
            mgx.MoE(8, 16, 4, 2, routing="sinkhorn", estimator=estimator)


def test_mlx_expert_choice_takes_each_experts_top_c_real_tokens_in_training_and_eval():
    rng = np.random.default_rng(0)
    router = mgx.Router(4, 5, 2, routing="expert_choice", capacity_factor=1.3)
    scores = rng.random((11, 5)).astype(np.float32)
    mask = np.array([True] * 9 + [False] * 2)
    scores[~mask] = 2.0  # padding would win every column if it were eligible
    c = 5  # min(ceil(1.3 * 9 real * 2 / 5), 9) = ceil(4.68)
    want = np.zeros((11, 5), dtype=bool)
    for j in range(5):
        want[sorted(range(9), key=lambda i: (-scores[i, j], i))[:c], j] = True
    for training in (True, False):
        router.train(training)
        got = np.array(router.selection(mx.array(mask)).select_expert_choice(mx.array(scores)))
        assert np.array_equal(got, want)
    x = mx.array(rng.standard_normal((11, 4)).astype(np.float32))
    router.train(True)
    a = router(x, mx.array(mask))
    router.eval()
    b = router(x, mx.array(mask))
    assert np.array_equal(np.array(a.chosen), np.array(b.chosen))
    assert np.array(a.chosen).sum(0).tolist() == [c] * 5 and not np.array(a.chosen)[~mask].any()
    assert np.array(router.load_counts).tolist() == [c] * 5  # training call only
    np.testing.assert_allclose(np.array(a.weights), np.array(a.scores) * np.array(a.chosen))


def test_mlx_sinkhorn_balances_the_real_tokens_only():
    rng = np.random.default_rng(3)
    scores = rng.random((30, 6)).astype(np.float32)
    mask = rng.random(30) > 0.4
    got = np.array(sinkhorn(mx.array(scores), mask=mx.array(mask)))
    np.testing.assert_allclose(got[mask], np.array(sinkhorn(mx.array(scores[mask]))), rtol=1e-5, atol=1e-7)
    assert not got[~mask].any()
