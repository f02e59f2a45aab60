"""BiasBalancer on MLX (moegrad/mlx/balancing.py) against the PyTorch side, and the fp32
selection bias it updates (kept exact through ``set_dtype``)."""

from __future__ import annotations

import pytest

from tests.mlx import need  # noqa: E402

mx = need("mlx.core")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import moegrad  # noqa: E402
from moegrad import mlx as mgx  # noqa: E402
from tests.mlx.mlx_helpers import max_diff, to_mx  # noqa: E402


def test_bias_balancer_matches_torch():
    tm = moegrad.MoE(8, 12, 6, 2, selection_bias=True)
    mm = mgx.from_torch(tm)
    x = torch.randn(40, 8)
    tm(x)
    mm(to_mx(x))
    t_loads = moegrad.BiasBalancer(tm, gamma=0.1).step()
    m_loads = mgx.BiasBalancer(mm, gamma=0.1).step()
    assert max_diff(m_loads[0], t_loads[0]) == 0
    assert max_diff(mm.router.bias, tm.router.bias) < 1e-7
    assert float(mx.abs(mm.router.bias).sum()) > 0
    assert int(mm.router.load_counts.sum()) == 0
    # the bias changes the selection but not the weights' formula
    r = mm.router(to_mx(x))
    s = np.array(r.scores)
    assert max_diff(r.weights, np.take_along_axis(s, np.array(r.indices).astype(np.int64), 1)) < 1e-7
    with pytest.raises(ValueError, match="selection_bias=True"):
        mgx.BiasBalancer(mgx.MoE(8, 12, 6, 2))


# --------------------------------------------------------------------------- issue 11
@pytest.mark.parametrize("bad", [[1], "model", None])
def test_bias_balancer_names_module_and_what_it_takes(bad):
    with pytest.raises(TypeError, match=r"BiasBalancer\(module=\.\.\.\) takes an mlx.nn.Module "
                                        r"holding moegrad.mlx Routers built with selection_bias=True"
                                        rf".*got {type(bad).__name__}"):
        mgx.BiasBalancer(bad)
    with pytest.raises(TypeError, match="got list; pass the model"):
        mgx.BiasBalancer([mgx.MoE(4, 8, 4, 1, selection_bias=True)])


def test_set_dtype_keeps_the_router_bias_fp32_and_exact():
    moe = mgx.MoE(4, 8, 4, 1, selection_bias=True)
    exact = mx.array([0.5, 0.501, 0.1234567, -3e-4])
    moe.router.bias = exact
    moe.set_dtype(mx.bfloat16)
    assert moe.router.gate.weight.dtype == mx.bfloat16 and moe.router.bias.dtype == mx.float32
    assert np.array_equal(np.array(moe.router.bias), np.array(exact))  # not rounded through bf16
    moe.set_dtype(mx.float16)
    assert np.array_equal(np.array(moe.router.bias), np.array(exact))
    # the selection sees the fp32 bias: 0.501 beats 0.5 (both are 0.5 in bf16)
    moe.router.bias = mx.array([0.5, 0.501, 0.5, 0.5])
    assert np.array(moe.router.select_topk(mx.full((3, 4), 0.25))).reshape(-1).tolist() == [1, 1, 1]
    # a different value in another dtype (e.g. loaded weights) is stored as fp32
    moe.router.bias = mx.array([1.0, 2.0, 3.0, 4.0], dtype=mx.bfloat16)
    assert moe.router.bias.dtype == mx.float32 and moe.router.bias.tolist() == [1.0, 2.0, 3.0, 4.0]
    out = moe(mx.ones((6, 4), dtype=mx.bfloat16))
    assert out.y.dtype == mx.bfloat16


START = [0.5, 0.5003, 0.4996, 0.5011]  # 0.5 and three values bf16 cannot hold


def _balance_steps(dtype, loads, gamma=1e-3):
    moe = mgx.MoE(4, 8, 4, 1, selection_bias=True)
    moe.router.bias = mx.array(START)
    moe.set_dtype(dtype)
    balancer = mgx.BiasBalancer(moe, gamma=gamma)
    out = []
    for load in loads:
        moe.router.load_counts = mx.array(load, dtype=mx.int64)
        balancer.step()
        out.append(np.array(moe.router.bias.astype(mx.float32)))
    return np.stack(out)


def test_bias_balancer_after_set_dtype_bf16_applies_updates_exactly_as_in_fp32():
    # experts 0, 1 alternate above/below the mean; expert 2 always below, expert 3 always above
    loads = [[9, 1, 1, 9] if s % 2 == 0 else [1, 9, 1, 9] for s in range(120)]
    ref = _balance_steps(mx.float32, loads)
    got = _balance_steps(mx.bfloat16, loads)
    assert np.array_equal(got, ref)  # symmetric: +1e-3 and -1e-3 both apply, as in fp32
    assert np.abs(got[-1, :2] - np.array(START[:2])).max() < 1e-6  # no drift
    assert np.abs(got[-1, 2:] - np.array([START[2] + 0.12, START[3] - 0.12])).max() < 1e-5


def test_the_former_losses_name_still_imports_with_a_deprecation_warning():
    from moegrad.mlx import balancing, losses

    with pytest.warns(DeprecationWarning, match="moegrad.mlx.losses.BiasBalancer has moved to "
                                                "moegrad.mlx.balancing.BiasBalancer"):
        assert losses.BiasBalancer is balancing.BiasBalancer is mgx.BiasBalancer


# --------------------------------------------------------------------------- QuantileBalancer
def test_quantile_balancer_matches_torch_within_a_bin():
    torch.manual_seed(4)
    tm = moegrad.MoE(8, 12, 6, 2, selection_bias=True, losses={})
    with torch.no_grad():
        tm.router.gate.weight[:2] += 1.0
        tm.router.bias.copy_(torch.tensor([0.1, -0.2, 0.05, 0.0, 0.3, -0.25]))
    mm = mgx.from_torch(tm)
    tq, mq = moegrad.QuantileBalancer(tm, bins=1024), mgx.QuantileBalancer(mm, bins=1024)
    width = (0.3 + 0.25 + 2) / 1024
    gen = torch.Generator().manual_seed(0)
    for tokens in (30, 17):  # 2 micro-batches with padding
        x = torch.randn(tokens, 8, generator=gen)
        mask = torch.rand(tokens, generator=gen) > 0.3
        tm(x, mask)
        mm(to_mx(x), to_mx(mask))
    assert int(mq.histograms[0].sum()) == int(tq.histograms[0].sum())
    t_loads, m_loads = tq.step(), mq.step()
    assert max_diff(m_loads[0], t_loads[0]) == 0
    assert max_diff(mm.router.bias, tm.router.bias) <= width
    assert mm.router.bias.dtype == mx.float32 and abs(float(mm.router.bias.sum())) < 1e-5
    assert int(mq.histograms[0].sum()) == 0
    mm.eval()
    mm(to_mx(torch.randn(5, 8)))
    assert int(mq.histograms[0].sum()) == 0  # eval mode counts nothing
    mq.remove()
    assert mm.router.observer is None
    mq = mgx.QuantileBalancer(mm.train(), bins=1024)
    mm(to_mx(torch.randn(5, 8)))
    mm.router.bias = mm.router.bias + 3.0  # outside the step's range: refused, not clamped
    with pytest.raises(ValueError, match="bias of router 0 changed during a step"):
        mm(to_mx(torch.randn(5, 8)))
    mq.reset()
    mm(to_mx(torch.randn(5, 8)))
    assert int(mq.histograms[0].sum()) == 5 * 6
    mq.remove()
    with pytest.raises(ValueError, match="bins=1"):
        mgx.QuantileBalancer(mm, bins=1)
    with pytest.raises(ValueError, match="top_k < num_experts"):
        mgx.QuantileBalancer(mgx.MoE(8, 12, 2, 2, selection_bias=True))
    with pytest.raises(ValueError, match="selection_bias=True"):
        mgx.QuantileBalancer(mgx.MoE(8, 12, 6, 2))
