"""The sampling estimators (gumbel, noisy_topk, sparsemixer) on MLX: identical results to the
PyTorch side in eval mode, and training-mode samples with the same statistics (selection
frequencies against the exact probabilities and against torch's samples, within 5 standard
errors; both generators are seeded, so the test is deterministic)."""

from __future__ import annotations

import math

import pytest

from tests.mlx import need  # noqa: E402

mx = need("mlx.core")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import moegrad  # noqa: E402
from moegrad import mlx as mgx  # noqa: E402
from tests.mlx.mlx_helpers import max_diff, mlx_grads, to_mx, torch_grads  # noqa: E402

TOL = 1e-4
SAMPLERS = [("gumbel", {}), ("gumbel", {"hard": True, "tau": 0.5, "normalize": True}),
            ("noisy_topk", {"losses": {"importance_load": 1e-2, "switch": 1e-2}}),
            ("sparsemixer", {"jitter_eps": 0.3})]
Z = np.array([1.2, 0.9, 0.5, 0.3, -0.2, -1.0], dtype=np.float32)  # the logits of every token
N = 20000


@pytest.mark.parametrize("estimator,kwargs", SAMPLERS, ids=lambda v: str(v))
def test_eval_mode_matches_torch(estimator, kwargs):
    tm = moegrad.MoE(16, 24, 6, 2, estimator=estimator, **kwargs)
    if estimator == "noisy_topk":
        with torch.no_grad():
            tm.router.estimator.w_noise.normal_(0, 0.3)
    tm.eval()
    mm = mgx.from_torch(tm)
    assert not mm.training
    x, weight = torch.randn(20, 16), torch.randn(20, 16)
    t = torch_grads(tm, x, weight)
    m = mlx_grads(mm, to_mx(x), to_mx(weight))
    assert np.array_equal(np.array(m["out"].routing.indices), t["out"].routing.indices.numpy())
    for key in ["y", "loss", "x", "router.gate.weight", "experts.w1", "experts.w2", "experts.w3"]:
        assert max_diff(m[key], t[key]) < TOL, key
    if estimator == "noisy_topk":
        assert max_diff(m["router.estimator.w_noise"], t["router.estimator.w_noise"]) < TOL
        assert float(np.abs(np.array(m["router.estimator.w_noise"])).max()) > 0
        assert max_diff(m["out"].routing.load_probs, t["out"].routing.load_probs) < 1e-5


def routers(estimator, **kwargs):
    """A torch router and its MLX twin whose logits are Z for the input ones(6)."""
    tr = moegrad.Router(6, 6, 2, estimator=estimator, **kwargs)
    with torch.no_grad():
        tr.gate.weight.copy_(torch.diag(torch.from_numpy(Z)))
    return tr, mgx.from_torch(tr)


def sample(tr, mr):
    torch.manual_seed(3)
    mx.random.seed(3)
    with torch.no_grad():
        rt = tr(torch.ones(N, 6))
    rm = mr(mx.ones((N, 6)))
    return rt, rm


def freq(indices, slot=0) -> np.ndarray:
    idx = np.asarray(indices)[:, slot]
    return np.bincount(idx.astype(np.int64), minlength=len(Z)) / len(idx)


def within(a, b, n_a, n_b=None, sigmas=5.0):
    """Frequencies a (of n_a samples) and b (exact when n_b is None) agree within sigmas SE."""
    p = np.where(n_b is None, b, (a + b) / 2)
    se = np.sqrt(p * (1 - p) / n_a + (0 if n_b is None else p * (1 - p) / n_b)) + 1e-12
    return bool(np.all(np.abs(a - b) <= sigmas * se + 1e-9)), np.abs(a - b) / se


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def test_gumbel_first_pick_is_a_softmax_sample():
    tr, mr = routers("gumbel", tau=0.7)
    rt, rm = sample(tr, mr)
    f_m, f_t = freq(rm.indices), freq(rt.indices.numpy())
    ok, z = within(f_m, softmax(Z), N)
    assert ok, z  # Gumbel-max: P(first pick = i) = softmax(z)_i, whatever tau
    ok, z = within(f_m, f_t, N, N)
    assert ok, z
    ok, z = within(freq(rm.indices, 1), freq(rt.indices.numpy(), 1), N, N)
    assert ok, z
    w_m, w_t = np.array(rm.weights), rt.weights.numpy()
    assert abs(w_m[:, 0].mean() - w_t[:, 0].mean()) < 5 * w_t[:, 0].std() / math.sqrt(N) * 1.5
    assert np.all(np.diff(np.array(rm.scores)[0]) <= 0)


def test_noisy_topk_samples_match_torch():
    tr, mr = routers("noisy_topk", noise_epsilon=0.5)
    rt, rm = sample(tr, mr)
    for slot in (0, 1):
        ok, z = within(freq(rm.indices, slot), freq(rt.indices.numpy(), slot), N, N)
        assert ok, (slot, z)
    # the noise really changes the selection (top-1 clean is expert 0)
    assert freq(rm.indices)[0] < 0.9
    lp_m, lp_t = np.array(rm.load_probs), rt.load_probs.numpy()
    assert np.abs(lp_m.mean(0) - lp_t.mean(0)).max() < 5 * (lp_t.std(0).max() / math.sqrt(N)) * 1.5
    assert max_diff(rm.noise_std, rt.noise_std) < 1e-6  # sigma = softplus(0) + 0.5


def test_sparsemixer_picks_and_multipliers():
    eps = 0.3
    tr, mr = routers("sparsemixer", jitter_eps=eps)
    rt, rm = sample(tr, mr)
    # first pick: Gumbel-max over the masked logits, i.e. the masked softmax
    best = Z.max()
    keep = (best - Z) / np.maximum(np.abs(Z), best) <= 2 * eps
    expected = softmax(np.where(keep, Z, -np.inf))
    assert 1 < keep.sum() < len(Z)
    f_m = freq(rm.indices)
    ok, z = within(f_m, expected, N)
    assert ok, z
    ok, z = within(f_m, freq(rt.indices.numpy()), N, N)
    assert ok, z
    ok, z = within(freq(rm.indices, 1), freq(rt.indices.numpy(), 1), N, N)
    assert ok, z
    # forward multiplier m = w / p_D in {1, 1/3}; P(m = 1) = P(D = argmax) + 1/4 P(D != argmax)
    p = expected[np.asarray(rm.indices)[:, 0].astype(np.int64)]
    m = np.array(rm.weights)[:, 0] / p
    assert np.allclose(np.minimum(abs(m - 1), abs(m - 1 / 3)), 0, atol=1e-5)
    share = np.isclose(m, 1.0).mean()
    p_one = expected[0] + 0.25 * (1 - expected[0])
    assert abs(share - p_one) < 5 * math.sqrt(p_one * (1 - p_one) / N)
    m_t = rt.weights.numpy()[:, 0] / expected[rt.indices.numpy()[:, 0]]
    assert abs(share - np.isclose(m_t, 1.0).mean()) < 5 * math.sqrt(2 * p_one * (1 - p_one) / N)


def test_seed_option_reproduces_and_rejects_generator():
    a = mgx.Router(6, 6, 2, estimator="gumbel", seed=7)
    b = mgx.Router(6, 6, 2, estimator="gumbel", seed=7)
    b.update(a.parameters())
    x = mx.random.normal((50, 6))
    first = np.array(a(x).indices)
    assert np.array_equal(first, np.array(b(x).indices))
    assert not np.array_equal(first, np.array(a(x).indices))  # the key moves on
    with pytest.raises(TypeError, match="seed"):
        mgx.Router(6, 6, 2, estimator="gumbel", generator=None)
    with pytest.raises(ValueError, match="selection_bias"):
        mgx.Router(6, 6, 2, estimator="sparsemixer", selection_bias=True)
