"""Balance losses on MLX against the PyTorch side (values and gate gradients, with padding
masks and per-sequence shapes). BiasBalancer: tests/mlx/test_mlx_balancing.py."""

from __future__ import annotations

import math

import pytest

from tests.mlx import need  # noqa: E402

mx = need("mlx.core")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import moegrad  # noqa: E402
from moegrad import losses as tl  # noqa: E402
from moegrad import mlx as mgx  # noqa: E402
from moegrad.mlx import losses as ml  # noqa: E402
from tests.mlx.mlx_helpers import max_diff, to_mx  # noqa: E402


@pytest.mark.parametrize("name", ["switch", "switch_megatron", "z_loss", "importance_load", "seq_aux"])
@pytest.mark.parametrize("masked", [False, True])
def test_loss_value_and_gate_gradient_match_torch(name, masked):
    estimator = "noisy_topk" if name == "importance_load" else "topk"
    tr = moegrad.Router(8, 6, 2, estimator=estimator, score="sigmoid" if name == "seq_aux" else "softmax")
    if estimator == "noisy_topk":
        with torch.no_grad():
            tr.estimator.w_noise.normal_(0, 0.5)
    tr.eval()
    mr = mgx.from_torch(tr)
    x = torch.randn(3, 7, 8)
    mask = torch.ones(3, 7, dtype=torch.bool)
    if masked:
        mask[0, 4:] = False
        mask[1] = False
    rt = tr(x, mask if masked else None)
    t_value = tl.LOSSES[name](rt)
    t_value.backward()

    def f(w):
        mr.gate.weight = w
        return ml.LOSSES[name](mr(to_mx(x), mx.array(mask.numpy()) if masked else None))

    w0 = mr.gate.weight
    value, grad = mx.value_and_grad(f)(w0)
    mr.gate.weight = w0
    assert float(t_value.detach()) > 0
    assert abs(float(value) - float(t_value.detach())) < 1e-5 * max(1.0, float(t_value.detach()))
    assert max_diff(grad, tr.gate.weight.grad) < 1e-5


def test_all_padding_gives_zero_and_checks_name_the_problem():
    mr = mgx.Router(8, 6, 2)
    r = mr(mx.ones((2, 3, 8)), mx.zeros((2, 3), dtype=mx.bool_))
    assert [float(ml.LOSSES[n](r)) for n in ("switch", "z_loss", "seq_aux")] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="noisy_topk"):
        ml.importance_load_loss(r)
    with pytest.raises(ValueError, match="unknown"):
        mgx.MoE(8, 12, 6, 2, losses={"nope": 1.0})
    with pytest.raises(ValueError, match="importance_load"):
        mgx.MoE(8, 12, 6, 2, losses={"importance_load": 1.0})
    with pytest.raises(ValueError, match="mask has shape"):
        mr(mx.ones((2, 3, 8)), mx.zeros((3, 2), dtype=mx.bool_))


def _z_routing(logits, mask=None):
    from moegrad.mlx.routing import Routing

    scores = mx.softmax(logits, axis=-1)
    idx = mx.argsort(-scores, axis=-1)[:, :2].astype(mx.uint32)
    return Routing(logits=logits, scores=scores, indices=idx,
                   weights=mx.take_along_axis(scores, idx, axis=-1), shape=(logits.shape[0],), mask=mask)


def _z_reference(rows, keep):
    """mean over the kept tokens of logsumexp^2 and its gradient 2 l_t / N softmax(z_t), in
    Python floats (fp64), written out."""
    lse = {t: max(rows[t]) + math.log(sum(math.exp(v - max(rows[t])) for v in rows[t])) for t in keep}
    grad = np.zeros((len(rows), len(rows[0])))
    for t in keep:
        denom = sum(math.exp(v - max(rows[t])) for v in rows[t])
        grad[t] = [2 * lse[t] / len(keep) * math.exp(v - max(rows[t])) / denom for v in rows[t]]
    return sum(lse[t] ** 2 for t in keep) / len(keep), grad


@pytest.mark.parametrize("masked", [False, True])
def test_z_loss_is_finite_and_exact_for_huge_finite_logits(masked):
    # |logsumexp| ~ 1.5e19: each square fits fp32, their sum over 8 tokens does not
    rng = np.random.default_rng(0)
    logits = mx.array((1.5e19 * (1 + 0.05 * rng.random((8, 6)))).astype(np.float32))
    keep_mask = np.array([True, True, False, True, True, True, False, True]) if masked else np.ones(8, bool)
    mask = mx.array(keep_mask) if masked else None
    value, grad = mx.value_and_grad(lambda z: ml.z_loss(_z_routing(z, mask)))(logits)
    ref_value, ref_grad = _z_reference(np.array(logits).astype(np.float64).tolist(),
                                       [t for t in range(8) if keep_mask[t]])
    assert math.isfinite(float(value)) and abs(float(value) - ref_value) <= 1e-5 * ref_value
    grad = np.array(grad).astype(np.float64)
    assert np.isfinite(grad).all()
    assert np.abs(grad - ref_grad).max() <= 1e-5 * np.abs(ref_grad).max()


def test_z_loss_beyond_fp32_raises_and_torch_agrees():
    with pytest.raises(ValueError, match=r"z_loss = mean_t logsumexp\(z_t\)\^2 = 1e\+40 exceeds the "
                                         r"float32 range \(3.4e\+38\).*\|logsumexp\| = 1e\+20"):
        ml.z_loss(_z_routing(mx.full((4, 6), 1e20)))
    with pytest.raises(ValueError, match="exceeds the float32 range"):
        tl.z_loss(_torch_routing(torch.full((4, 6), 1e20)))
    bad = mx.array(np.where(np.arange(24).reshape(4, 6) == 8, np.inf, 0.5).astype(np.float32))
    assert not math.isfinite(float(ml.z_loss(_z_routing(bad))))  # non-finite logits: no claim


def _torch_routing(logits):
    from moegrad.routing import Routing

    scores = torch.softmax(logits, -1)
    idx = scores.topk(2, -1).indices
    return Routing(logits=logits, scores=scores, indices=idx, weights=scores.gather(1, idx),
                   shape=(logits.shape[0],))


def test_switch_megatron_is_switch_over_k():
    mr = mgx.Router(8, 6, 3)
    r = mr(mx.array(np.random.default_rng(1).normal(size=(10, 8)).astype(np.float32)))
    assert abs(float(ml.switch_megatron_loss(r)) * 3 - float(ml.switch_loss(r))) < 1e-6
    moe = mgx.MoE(8, 12, 6, 2, losses={"switch_megatron": 0.5})
    out = moe(mx.ones((4, 8)))
    assert abs(float(out.aux_loss) - 0.5 * float(ml.switch_loss(out.routing)) / 2) < 1e-6
