"""The MLX layer as an MLX user trains it: parameters vs frozen state, an optimizer loop,
train/eval behaviour of the state, and argument checks naming the problem."""

from __future__ import annotations

import pytest

from tests.mlx import need  # noqa: E402

mx = need("mlx.core")

import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from moegrad import mlx as mgx  # noqa: E402
from tests.mlx.mlx_helpers import mlx_grads  # noqa: E402


def test_trainable_parameters_and_frozen_state():
    moe = mgx.MoE(8, 16, 4, 2, estimator="default_moe", selection_bias=True)
    trainable = {k for k, _ in tree_flatten(moe.trainable_parameters())}
    everything = {k for k, _ in tree_flatten(moe.parameters())}
    assert trainable == {"router.gate.weight", "experts.w1", "experts.w3", "experts.w2"}
    assert everything - trainable == {"router.bias", "router.load_counts",
                                      "router.estimator.defaults", "router.estimator.seen",
                                      "router.estimator.skipped"}
    noisy = mgx.MoE(8, 16, 4, 2, estimator="noisy_topk")
    assert "router.estimator.w_noise" in {k for k, _ in tree_flatten(noisy.trainable_parameters())}


@pytest.mark.parametrize("estimator", ["dense", "default_moe", "gumbel", "sparsemixer", "noisy_topk"])
def test_optimizer_loop_learns_and_updates_state_in_training_only(estimator):
    mx.random.seed(0)
    moe = mgx.MoE(8, 16, 4, 2, estimator=estimator, losses={"switch": 1e-2, "z_loss": 1e-3})
    target = mgx.MoE(8, 16, 4, 2, losses={})
    x = mx.random.normal((64, 8))
    y_true = target(x).y

    def loss_fn(model):
        out = model(x)
        return ((out.y - y_true) ** 2).mean() + out.aux_loss

    def eval_mse():
        moe.eval()
        value = ((moe(x).y - y_true) ** 2).mean().item()
        moe.train()
        return value

    step = nn.value_and_grad(moe, loss_fn)
    opt = optim.Adam(learning_rate=1e-2)
    start = eval_mse()
    for _ in range(15):
        loss, grads = step(moe)
        opt.update(moe, grads)
        mx.eval(moe.parameters(), opt.state)
    assert eval_mse() < 0.7 * start
    assert int(moe.router.load_counts.sum()) == 15 * 64 * 2
    moe.eval()
    before = np.array(moe.router.load_counts)
    moe(x)
    assert np.array_equal(np.array(moe.router.load_counts), before)
    if estimator == "default_moe":
        d = np.array(moe.router.estimator.defaults)
        moe(x)
        assert np.abs(d).sum() > 0 and np.array_equal(np.array(moe.router.estimator.defaults), d)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="estimator='nope'"):
        mgx.MoE(8, 16, 4, 2, estimator="nope")
    with pytest.raises(ValueError, match="top_k=5"):
        mgx.Router(8, 4, 5)
    with pytest.raises(ValueError, match="score='relu'"):
        mgx.Router(8, 4, 2, score="relu")
    with pytest.raises(ValueError, match="n_group=3"):
        mgx.Router(8, 4, 2, n_group=3, topk_group=1)
    with pytest.raises(TypeError, match="unknown option"):
        mgx.Router(8, 4, 2, estimator="dense", tau=1.0)
    with pytest.raises(ValueError, match="activation='relu'"):
        mgx.MoE(8, 16, 4, 2, activation="relu")
    with pytest.raises(ValueError, match="capacity_factor"):
        mgx.MoE(8, 16, 4, 2, capacity_factor=0.0)
    moe = mgx.MoE(8, 16, 4, 2)
    with pytest.raises(ValueError, match="feature size 7"):
        moe(mx.zeros((3, 7)))
    with pytest.raises(TypeError, match="floating-point"):
        moe(mx.zeros((3, 8), dtype=mx.int32))
    with pytest.raises(TypeError, match="mlx.core.array"):
        moe(np.zeros((3, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="not finite for 1 of 3"):
        moe(mx.array([[0.0] * 8, [float("nan")] * 8, [1.0] * 8]))
    with pytest.raises(ValueError, match="mask must be bool"):
        moe(mx.zeros((1, 3, 8)), mx.array([[0.5, 1.0, 1.0]]))


@pytest.mark.parametrize("case", ["nan_token", "fp16_overflow"])
def test_default_moe_skips_non_finite_observations(case):
    """One NaN token (check_finite=False) or one fp16 token whose expert outputs overflow never
    reaches default_moe's defaults: the experts it reached skip this observation (counted in
    ``skipped`` and ``stats``) and every other token keeps topk's output, now and later."""
    mx.random.seed(5)
    kw = {"check_finite": False} if case == "nan_token" else {}
    moe = mgx.MoE(6, 12, 5, 2, estimator="default_moe", losses={}, **kw)
    topk = mgx.MoE(6, 12, 5, 2, estimator="topk", losses={}, **kw)
    topk.update(moe.trainable_parameters())
    dtype = mx.float16 if case == "fp16_overflow" else mx.float32
    moe.set_dtype(dtype)
    topk.set_dtype(dtype)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((10, 6)).astype(np.float32)
    if case == "nan_token":
        x[3, 2] = np.nan
    else:
        x[3] = x[3] / np.abs(x[3]).max() * 60000.0  # finite in fp16; its expert outputs overflow
    x = mx.array(x).astype(dtype)
    out, ref = moe(x), topk(x)
    y, y_ref = np.array(out.y.astype(mx.float32)), np.array(ref.y.astype(mx.float32))
    others = np.arange(10) != 3
    assert not np.isfinite(y[3]).all() and not np.isfinite(y_ref[3]).all()
    assert np.isfinite(y[others]).all() and np.array_equal(y[others], y_ref[others])
    est = moe.router.estimator
    assert bool(mx.isfinite(est.defaults).all())
    hit_by_bad = np.zeros(5, dtype=np.int64)
    hit_by_bad[np.array(out.routing.indices)[3]] = 1
    assert np.array_equal(np.array(est.skipped), hit_by_bad)
    assert np.array_equal(np.array(out.stats.skipped_observations), hit_by_bad)
    routed = np.array(out.stats.tokens_per_expert) > 0
    assert np.array_equal(np.array(est.seen), routed & (hit_by_bad == 0))

    x2 = mx.array(rng.standard_normal((12, 6)).astype(np.float32)).astype(dtype)
    weight = mx.array(rng.standard_normal((12, 6)).astype(np.float32))
    for train in (True, False):  # later batches, train then eval: topk's output, finite gradients
        moe.train(train)
        topk.train(train)
        assert np.array_equal(np.array(moe(x2).y), np.array(topk(x2).y))
        g = mlx_grads(moe, x2, weight)
        assert np.isfinite(np.array(g["router.gate.weight"].astype(mx.float32))).all()
        assert np.isfinite(np.array(g["x"].astype(mx.float32))).all()
    assert bool(est.seen.all())
    assert np.array_equal(np.array(est.skipped), hit_by_bad)
