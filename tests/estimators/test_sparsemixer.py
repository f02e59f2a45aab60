"""sparsemixer: SparseMixer-v2 against a per-token reference written from the GRIN formulas,
and against transformers' PhiMoE implementation (top-2) where it is installed."""

import math

import pytest
import torch

import moegrad


def _uniform(gen, shape):
    u = torch.rand(shape, generator=gen)
    return u.clamp(torch.finfo(torch.float32).tiny, 1 - torch.finfo(torch.float32).eps)


def _reference(z, k, eps, seed, training):
    """Per token and pick, with Python floats: returns indices, forward weights and dL/dz for
    L = sum_j a_j w_j given a [T, K] via `grad(a)`."""
    gen = torch.Generator().manual_seed(seed)
    t_count, e_count = z.shape
    picks, fwd, pd_rows = [], [], []
    current = z.clone()
    draws = []
    for _ in range(k):
        g = -torch.log(-torch.log(_uniform(gen, (t_count, e_count)))) if training else None
        u = _uniform(gen, (t_count, 1)) if training else None
        draws.append((g, u))
    for j in range(k):
        g, u = draws[j]
        pick_j, w_j, rows = [], [], []
        for t in range(t_count):
            row = current[t].tolist()
            best = max(row)
            top = row.index(best)
            keep = [math.isfinite(row[i]) and not ((best - z[t, i].item()) / max(abs(z[t, i].item()), best) > 2 * eps)
                    for i in range(e_count)]
            m_logits = [row[i] if keep[i] else -math.inf for i in range(e_count)]
            mx = max(m_logits)
            ex = [math.exp(v - mx) if math.isfinite(v) else 0.0 for v in m_logits]
            p = [v / sum(ex) for v in ex]
            if training:
                noisy = [m_logits[i] + g[t, i].item() for i in range(e_count)]
                d = noisy.index(max(noisy))
                m = 1.0 if (d == top or u[t, 0].item() < 0.25) else 1.0 / 3.0
            else:
                d, m = top, 1.0
            pick_j.append(d)
            w_j.append(m * p[d])
            rows.append([p[d] * ((1.0 if i == d else 0.0) - p[i]) for i in range(e_count)])  # dp_D/dz
            current[t, d] = -math.inf
        picks.append(pick_j)
        fwd.append(w_j)
        pd_rows.append(rows)
    idx = torch.tensor(picks).T
    w = torch.tensor(fwd).T
    jac = torch.tensor(pd_rows).permute(1, 0, 2)  # [T, K, E]
    return idx, w, jac


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_matches_reference_written_from_the_formulas(training, k):
    torch.manual_seed(4)
    router = moegrad.Router(6, 7, k, estimator="sparsemixer", jitter_eps=0.3,
                            generator=torch.Generator().manual_seed(9))
    router.train(training)
    with torch.no_grad():
        router.gate.weight.mul_(4.0)  # logits of a trained-looking router
    x = torch.randn(12, 6)
    r = router(x)
    a = torch.randn(12, k)
    (r.weights * a).sum().backward()

    idx, w, jac = _reference(r.logits.detach(), k, 0.3, 9, training)
    assert torch.equal(r.indices, idx)
    torch.testing.assert_close(r.weights.detach(), w, rtol=1e-5, atol=1e-6)
    dz = torch.einsum("tk,tke->te", a, jac)
    torch.testing.assert_close(router.gate.weight.grad, dz.T @ x, rtol=1e-4, atol=1e-6)


def test_heun_multiplier_frequencies():
    """Non-argmax samples get m = 1 with probability 1/4, else 1/3."""
    torch.manual_seed(0)
    router = moegrad.Router(4, 4, 1, estimator="sparsemixer", jitter_eps=5.0,
                            generator=torch.Generator().manual_seed(1)).train()
    x = torch.randn(1, 4).expand(40000, 4)
    r = router(x)
    top = r.logits[0].argmax()
    p_top = torch.softmax(r.logits[0], -1)  # nothing masked with this eps
    other = r.indices[:, 0] != top
    p_d = p_top[r.indices[other, 0]]
    m = r.weights.detach()[other, 0] / p_d
    frac_one = float((m - 1).abs().lt(1e-4).float().mean())
    assert abs(frac_one - 0.25) < 0.02
    assert torch.all(((m - 1).abs() < 1e-4) | ((m - 1 / 3).abs() < 1e-4))
    # the sample itself follows the masked softmax (Gumbel-max)
    freq = torch.bincount(r.indices[:, 0], minlength=4).float() / 40000
    assert torch.all((freq - p_top).abs() < 0.01)


def test_agrees_with_transformers_phimoe_sparsemixer_top2():
    phimoe = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    torch.manual_seed(3)
    router = moegrad.Router(6, 8, 2, estimator="sparsemixer", jitter_eps=0.01).eval()
    with torch.no_grad():
        router.gate.weight.mul_(5.0)
    x = torch.randn(32, 6)
    r = router(x)
    mult, sel = phimoe.sparsemixer(r.logits.detach(), jitter_eps=0.01, training=False, top_k=2)
    assert torch.equal(r.indices, sel)
    torch.testing.assert_close(r.weights.detach(), mult)

    # training: for our samples and multipliers, PhiMoE's custom backward gives our gradient
    router.train()
    router.estimator.generator = torch.Generator().manual_seed(2)
    z = r.logits.detach().clone().requires_grad_(True)
    ours = router.estimator.route(x, z, torch.softmax(z, -1), router)
    a = torch.randn(32, 2)
    (ours.weights * a).sum().backward()
    ref_grad = torch.zeros_like(z)
    current = r.logits.detach().clone()
    for j in range(2):
        zz = z.detach().clone().requires_grad_(True)
        masked, _ = router.estimator._mask(current, zz.detach())
        p = torch.softmax(masked, -1)
        pick = ours.indices[:, j:j + 1]
        p_d = p.gather(1, pick)
        m = ours.weights.detach()[:, j:j + 1] / p_d
        out = phimoe.PhimoeMultiplier.apply(zz, p_d, pick, p, m)
        torch.testing.assert_close(out.detach(), ours.weights.detach()[:, j:j + 1])
        (out * a[:, j:j + 1]).sum().backward()
        ref_grad += zz.grad
        current = current.scatter(1, pick, float("-inf"))
    torch.testing.assert_close(z.grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_eval_is_deterministic_topk():
    router = moegrad.Router(6, 8, 3, estimator="sparsemixer").eval()
    x = torch.randn(10, 6)
    a, b = router(x), router(x)
    assert torch.equal(a.indices, a.scores.topk(3, -1).indices)
    assert torch.equal(a.weights, b.weights)
