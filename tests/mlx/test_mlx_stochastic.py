"""The sampling estimators (gumbel, noisy_topk, sparsemixer) on MLX: identical results to the
PyTorch side in eval mode, training-mode samples with the same statistics (selection
frequencies against the exact probabilities and against torch's samples, within 5 standard
errors; both generators are seeded, so the test is deterministic), and training-mode router
gradients equal to an independent float64 reference of DESIGN section 4's formulas, evaluated
on the noise the estimator drew (replayed from its seed)."""

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


# -- training-mode router gradients against the formulas (DESIGN section 4), replaying the noise.
# The estimator draws from a private key when given ``seed``: key = mx.random.key(seed), split on
# every draw (moegrad.mlx.ops.Noise). gumbel draws one Gumbel [T, E]; noisy_topk one normal
# [T, E]; sparsemixer per pick a Gumbel [T, E], then a uniform [T, 1]. The references below
# redo each estimator in float64 numpy from the replayed draws and the formulas only, with the
# task gradient <g, e_i> taken from a dense evaluation of every expert; loss L = sum(y * R).

F32 = np.finfo(np.float32)
SEED = 11
GRAD_CASES = [
    ("gumbel", dict(tau=0.7)),
    ("gumbel", dict(tau=0.5, normalize=True, temperature=1.5, routed_scaling_factor=2.0)),
    ("gumbel", dict(tau=0.5, hard=True)),
    ("gumbel", dict(tau=0.8, hard=True, normalize=True)),
    ("noisy_topk", dict(noise_epsilon=0.1)),
    ("noisy_topk", dict(noise_epsilon=0.5, temperature=2.0, routed_scaling_factor=1.5)),
    ("sparsemixer", dict(jitter_eps=0.3)),
    ("sparsemixer", dict(jitter_eps=0.4, top_k=3, temperature=0.8, routed_scaling_factor=2.0)),
]


def replay(seed: int, draws: list) -> list:
    """The estimator's draws, in order: ("uniform" | "gumbel" | "normal", shape) -> float64."""
    key, out = mx.random.key(seed), []
    for kind, shape in draws:
        key, sub = mx.random.split(key)
        if kind == "normal":
            out.append(np.array(mx.random.normal(shape=shape, dtype=mx.float32, key=sub), np.float64))
            continue
        u = np.array(mx.random.uniform(shape=shape, dtype=mx.float32, key=sub), np.float64)
        u = np.clip(u, F32.tiny, 1.0 - F32.eps)
        out.append(u if kind == "uniform" else -np.log(-np.log(u)))
    return out


def np_softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def every_expert_np(moe, x: np.ndarray) -> np.ndarray:
    """SwiGLU experts on every token: x [T, D] -> [T, E, D] (float64)."""
    w1, w3, w2 = (np.array(w, np.float64) for w in (moe.experts.w1, moe.experts.w3, moe.experts.w2))
    up = np.einsum("td,ehd->teh", x, w1)
    h = up / (1.0 + np.exp(-up)) * np.einsum("td,ehd->teh", x, w3)
    return np.einsum("teh,edh->ted", h, w2)


def gumbel_reference(z, u, G, k, tau, hard, normalize, c):
    """-> (indices [T, K], weights [T, K], dL/dz [T, E]); u [T, E] = <g, e_i>."""
    p = np_softmax((z + G) / tau)
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    p_s, u_s = np.take_along_axis(p, idx, -1), np.take_along_axis(u, idx, -1)
    total = p_s.sum(-1, keepdims=True)
    w = c * (p_s / total if normalize else p_s)
    if hard:
        w = np.full_like(w, c)  # w = c (1 + w_soft - sg(w_soft)): the soft gradient below
    if normalize:  # w_i = c p_i / P, P = sum_S p: dL/dp_j = c (u_j - sum_S u p / P) / P
        dp_s = c * (u_s - (u_s * p_s).sum(-1, keepdims=True) / total) / total
    else:
        dp_s = c * u_s
    dp = np.zeros_like(p)
    np.put_along_axis(dp, idx, dp_s, -1)
    da = p * (dp - (dp * p).sum(-1, keepdims=True))  # softmax Jacobian
    return idx, w, da / tau


def noisy_reference(z, u, eps, x, w_noise, k, noise_epsilon, c):
    """-> (indices, weights, dL/dz, dL/dW_noise [E, D])."""
    pre = x @ w_noise.T
    sigma = np.logaddexp(0.0, pre) + noise_epsilon  # softplus
    H = z + eps * sigma
    idx = np.argsort(-H, axis=-1, kind="stable")[:, :k]
    q = np_softmax(np.take_along_axis(H, idx, -1))
    u_s = np.take_along_axis(u, idx, -1)
    dH_s = c * q * (u_s - (u_s * q).sum(-1, keepdims=True))
    dH = np.zeros_like(H)
    np.put_along_axis(dH, idx, dH_s, -1)
    d_pre = dH * eps / (1.0 + np.exp(-pre))  # dH/dsigma = eps, softplus' = sigmoid
    return idx, c * q, dH, d_pre.T @ x


def sparsemixer_reference(z, u, draws, k, jitter_eps, c):
    """-> (indices, weights, dL/dz, multipliers m [T, K]); draws: per pick (Gumbel, uniform)."""
    num_tokens, num_experts = z.shape
    idx, w, m = (np.zeros((num_tokens, k)) for _ in range(3))
    dz = np.zeros_like(z)
    for t in range(num_tokens):
        current = z[t].copy()
        for j in range(k):
            G, U = draws[2 * j][t], draws[2 * j + 1][t, 0]
            best, top = current.max(), int(np.argmax(current))
            drop = (best - z[t]) / np.maximum(np.abs(z[t]), best) > 2 * jitter_eps
            masked = np.where(drop, -np.inf, current)
            p = np_softmax(masked)
            d = int(np.argmax(masked + G))
            m[t, j] = 1.0 if (d == top or U < 0.25) else 1.0 / 3.0
            idx[t, j], w[t, j] = d, c * m[t, j] * p[d]
            # gradient of h = p_D e_D alone: c <g, e_D> p_D (delta_iD - p_i)
            dz[t] += c * u[t, d] * p[d] * (np.eye(num_experts)[d] - p)
            current[d] = -np.inf
    return idx.astype(np.int64), w, dz, m


@pytest.mark.parametrize("estimator,kwargs", GRAD_CASES, ids=lambda v: str(v))
def test_training_gradient_matches_the_formula_with_replayed_noise(estimator, kwargs):
    kwargs = dict(kwargs)
    top_k = kwargs.pop("top_k", 2)
    temperature = kwargs.get("temperature", 1.0)
    c = kwargs.get("routed_scaling_factor", 1.0)
    num_tokens, dim, num_experts = 12, 8, 6
    mx.random.seed(5)
    moe = mgx.MoE(dim, 12, num_experts, top_k, estimator=estimator, losses={}, seed=SEED, **kwargs)
    moe.router.gate.weight = 1.5 * mx.random.normal((num_experts, dim))  # spread-out logits
    if estimator == "noisy_topk":
        moe.router.estimator.w_noise = 0.5 * mx.random.normal((num_experts, dim))
    x, R = mx.random.normal((num_tokens, dim)), mx.random.normal((num_tokens, dim))
    assert moe.training
    got = mlx_grads(moe, x, R)  # one training forward: the estimator's first draws from SEED

    xn, Rn = np.array(x, np.float64), np.array(R, np.float64)
    z = xn @ np.array(moe.router.gate.weight, np.float64).T / temperature
    u = np.einsum("ted,td->te", every_expert_np(moe, xn), Rn)  # <g, e_i>, g = R
    shape = (num_tokens, num_experts)
    if estimator == "gumbel":
        (G,) = replay(SEED, [("gumbel", shape)])
        idx, w, dz = gumbel_reference(z, u, G, top_k, kwargs["tau"], kwargs.get("hard", False),
                                      kwargs.get("normalize", False), c)
        clean = np.argsort(-z, axis=-1, kind="stable")[:, :top_k]
    elif estimator == "noisy_topk":
        (eps,) = replay(SEED, [("normal", shape)])
        wn = np.array(moe.router.estimator.w_noise, np.float64)
        idx, w, dz, dwn = noisy_reference(z, u, eps, xn, wn, top_k, kwargs["noise_epsilon"], c)
        clean = np.argsort(-z, axis=-1, kind="stable")[:, :top_k]
        assert max_diff(got["router.estimator.w_noise"], dwn) < 1e-5 * max(1.0, np.abs(dwn).max())
        assert np.abs(dwn).max() > 1e-3
    else:
        draws = replay(SEED, [(kind, s) for _ in range(top_k)
                              for kind, s in (("gumbel", shape), ("uniform", (num_tokens, 1)))])
        idx, w, dz, m = sparsemixer_reference(z, u, draws, top_k, kwargs["jitter_eps"], c)
        clean = np.argsort(-z, axis=-1, kind="stable")[:, :top_k]
        assert (m == 1 / 3).any() and (m == 1).any()  # both Heun multipliers occur
        best = z.max(-1, keepdims=True)
        dropped = (best - z) / np.maximum(np.abs(z), best) > 2 * kwargs["jitter_eps"]
        assert dropped.any() and ((~dropped).sum(-1) > 1).any()  # the first pick's mask matters

    routing = got["out"].routing
    assert np.array_equal(np.array(routing.indices).astype(np.int64), idx)
    assert not np.array_equal(idx, clean)  # the noise changed the selection somewhere
    assert max_diff(routing.weights, w) < 1e-5 * c
    g_ref = dz.T @ xn / temperature  # z = x W^T / temperature
    assert np.abs(g_ref).max() > 1e-2
    assert max_diff(got["router.gate.weight"], g_ref) < 1e-5 * max(1.0, np.abs(g_ref).max())
