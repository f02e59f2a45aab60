"""noisy_topk: Shazeer 2017 noisy gating and its smooth load."""

import torch
import torch.nn.functional as F

import moegrad
from moegrad.estimators.noisy import smooth_load


def _router(seed=0, k=2, experts=5):
    torch.manual_seed(2)
    router = moegrad.Router(4, experts, k, estimator="noisy_topk",
                            generator=torch.Generator().manual_seed(seed))
    torch.nn.init.normal_(router.estimator.w_noise, std=0.5)
    return router.train()


def test_training_gating_matches_the_paper():
    router = _router(seed=1)
    x = torch.randn(9, 4)
    r = router(x)
    z = x @ router.gate.weight.T
    sigma = F.softplus(x @ router.estimator.w_noise.T) + 1e-2
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    h = z + eps * sigma
    top = h.topk(2, -1)
    assert torch.equal(r.indices, top.indices)
    torch.testing.assert_close(r.weights, torch.softmax(top.values, -1))
    torch.testing.assert_close(r.noise_std, sigma)
    torch.testing.assert_close(r.load_probs, smooth_load(z, h, sigma, 2))
    (r.weights[:, 0].sum() + r.load_probs.sum()).backward()
    assert router.estimator.w_noise.grad.abs().sum() > 0
    assert router.gate.weight.grad.abs().sum() > 0


def test_smooth_load_matches_monte_carlo_of_redrawn_own_noise():
    torch.manual_seed(5)
    t, e, k, draws = 6, 5, 2, 40000
    clean = torch.randn(t, e)
    sigma = torch.rand(t, e) + 0.3
    noisy = clean + torch.randn(t, e) * sigma
    p = smooth_load(clean, noisy, sigma, k)
    for tok in range(t):
        for i in range(e):
            h = noisy[tok].expand(draws, e).clone()
            h[:, i] = clean[tok, i] + torch.randn(draws) * sigma[tok, i]
            in_top = (h.topk(k, -1).indices == i).any(-1).float().mean()
            se = float((p[tok, i] * (1 - p[tok, i]) / draws).sqrt())
            assert abs(float(in_top - p[tok, i])) < 5 * se + 1e-3


def test_smooth_load_all_ones_when_k_is_every_expert():
    z = torch.randn(3, 4)
    torch.testing.assert_close(smooth_load(z, z, torch.ones(3, 4), 4), torch.ones(3, 4))


def test_eval_has_no_noise_and_is_deterministic():
    router = _router(seed=2)
    router.eval()
    x = torch.randn(7, 4)
    a, b = router(x), router(x)
    assert torch.equal(a.indices, a.logits.topk(2, -1).indices)
    assert torch.equal(a.weights, b.weights)
    torch.testing.assert_close(a.weights, torch.softmax(a.logits.gather(1, a.indices), -1))


def test_router_gradient_matches_hand_derived_chain_rule():
    """dL/dW_gate and dL/dW_noise for L = sum_t <c_t, w_t>, w_t = softmax(H_t[S_t]),
    H = z + eps * sigma, sigma = softplus(x W_noise^T) + 1e-2, derived by hand per token."""
    router = _router(seed=3, k=3, experts=6)
    x = torch.randn(7, 4, dtype=torch.float64)
    router.double()
    c = torch.randn(7, 3, dtype=torch.float64)
    r = router(x)
    (r.weights * c).sum().backward()

    wg = router.gate.weight.detach()
    wn = router.estimator.w_noise.detach()
    eps = torch.randn((7, 6), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grad_wg = torch.zeros_like(wg)
    grad_wn = torch.zeros_like(wn)
    for t in range(7):
        z = wg @ x[t]
        a = wn @ x[t]
        sigma = torch.log1p(torch.exp(a)) + 1e-2
        h = z + eps[t] * sigma
        order = sorted(range(6), key=lambda i: -float(h[i]))[:3]
        assert order == r.indices[t].tolist()
        p = torch.exp(h[order] - h[order].max())
        p = p / p.sum()
        dh_kept = p * (c[t] - (p * c[t]).sum())  # softmax Jacobian^T c
        dh = torch.zeros(6, dtype=torch.float64)
        dh[order] = dh_kept
        grad_wg += torch.outer(dh, x[t])  # dH/dz = 1
        dsigma = dh * eps[t]
        grad_wn += torch.outer(dsigma * torch.sigmoid(a), x[t])  # softplus' = sigmoid
    torch.testing.assert_close(router.gate.weight.grad, grad_wg)
    torch.testing.assert_close(router.estimator.w_noise.grad, grad_wn)


def test_smooth_load_gradcheck_float64():
    torch.manual_seed(4)
    clean = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    sigma = (torch.rand(5, 6, dtype=torch.float64) + 0.5).requires_grad_()
    noisy = (clean.detach() + torch.randn(5, 6, dtype=torch.float64) * sigma.detach()).requires_grad_()
    assert torch.autograd.gradcheck(lambda c, n, s: smooth_load(c, n, s, 2), (clean, noisy, sigma))
