"""ReMoE in MLX (routing="remoe"): the same gates, penalty, coefficient and gradients as the
PyTorch layer (tested against a dense reference in tests/test_remoe.py), and the adaptive
coefficient steering the mean active experts to K on the same small task."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from tests.mlx import need

mx = need("mlx.core")
import torch  # noqa: E402

import moegrad  # noqa: E402
from moegrad import mlx as mgx  # noqa: E402
from tests.mlx.mlx_helpers import max_diff, mlx_grads, to_mx, torch_grads  # noqa: E402


@pytest.mark.parametrize("masked", [False, True])
def test_mlx_remoe_equals_pytorch_forward_gradients_and_coefficient(masked):
    torch.manual_seed(0)
    tmoe = moegrad.MoE(6, 10, 5, 2, routing="remoe", l1_init=0.3, temperature=0.8,
                       routed_scaling_factor=1.5)
    mmoe = mgx.from_torch(tmoe)
    assert mmoe.router.config.routing == "remoe" and float(mmoe.router.l1_coefficient) == pytest.approx(0.3)
    x = torch.randn(17, 6)
    weight = torch.randn(17, 6)
    mask = (torch.arange(17) % 4 != 3) if masked else None
    t = torch_grads(tmoe, x, weight, mask)
    m = mlx_grads(mmoe, to_mx(x), to_mx(weight), None if mask is None else to_mx(mask))
    assert max_diff(t["y"], m["y"]) < 1e-5 and max_diff(t["loss"], m["loss"]) < 1e-4
    assert max_diff(t["x"], m["x"]) < 1e-5
    assert max_diff(t["router.gate.weight"], m["router.gate.weight"]) < 1e-4
    assert max_diff(t["experts.w1"], m["experts.w1"]) < 1e-5
    assert np.array_equal(np.array(m["out"].routing.chosen), t["out"].routing.chosen.numpy())
    assert max_diff(t["out"].losses["remoe_l1"], m["out"].losses["remoe_l1"]) < 1e-5
    assert int(m["out"].stats.unrouted_tokens) == int(t["out"].stats.unrouted_tokens)
    # both routers updated lambda once from the same active count (training mode)
    assert float(mmoe.router.l1_coefficient) == pytest.approx(float(tmoe.router.l1_coefficient), rel=1e-6)
    assert float(tmoe.router.l1_coefficient) != pytest.approx(0.3)
    back = mgx.to_torch(mmoe)
    assert float(back.router.l1_coefficient) == pytest.approx(float(tmoe.router.l1_coefficient), rel=1e-6)


def test_mlx_adaptive_coefficient_drives_mean_active_experts_to_top_k():
    """tests/test_remoe.py's task in MLX: the mean active experts over steps 100-200 is within
    10% of K = 2."""
    import mlx.nn as nn
    import mlx.optimizers as optim

    mx.random.seed(0)
    rng = np.random.default_rng(0)
    dim, k = 16, 2
    moe = mgx.MoE(dim, 2 * dim, 8, k, routing="remoe", l1_init=1e-2, l1_alpha=1.05)
    a = mx.array(rng.standard_normal((dim, 2 * dim)).astype(np.float32) / dim ** 0.5)
    b = mx.array(rng.standard_normal((2 * dim, dim)).astype(np.float32) / (2 * dim) ** 0.5)
    centers = rng.standard_normal((8, dim)).astype(np.float32)
    opt = optim.Adam(learning_rate=3e-3)
    active = []

    def loss_fn(model, x):
        out = model(x)
        return (out.y - mx.tanh(x @ a) @ b).square().mean() + out.aux_loss, out.stats.tokens_per_expert

    step = nn.value_and_grad(moe, loss_fn)
    for _ in range(200):
        x = mx.array(0.5 * rng.standard_normal((64, dim)).astype(np.float32)
                     + centers[rng.integers(0, 8, 64)])
        (loss, load), grads = step(moe, x)
        opt.update(moe, grads)
        mx.eval(moe.parameters(), moe.router.l1_coefficient, opt.state, loss)
        active.append(float(load.sum()) / 64)
    assert statistics.mean(active[:10]) > 3.0
    assert abs(statistics.mean(active[100:]) - k) <= 0.1 * k, statistics.mean(active[100:])
    assert float(moe.router.l1_coefficient) != pytest.approx(1e-2)  # it adapted
