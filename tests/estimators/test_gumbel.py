"""gumbel: sampling, relaxed weights, hard straight-through, temperature limit."""

import pytest
import torch

import moegrad


def _router(seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(11)
    router = moegrad.Router(5, 6, kw.pop("top_k", 2), estimator="gumbel", generator=gen, **kw)
    return router.train()


def _gumbel_like(z, seed):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(z.shape, generator=gen, dtype=z.dtype)
    u = u.clamp(torch.finfo(z.dtype).tiny, 1 - torch.finfo(z.dtype).eps)
    return -torch.log(-torch.log(u))


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_training_sample_weights_and_gradient_match_hand_written_relaxation(hard, tau):
    router = _router(seed=3, tau=tau, hard=hard)
    x = torch.randn(8, 5)
    r = router(x)
    loss_w = torch.randn(8, 2)
    (r.weights * loss_w).sum().backward()

    gate = router.gate.weight.detach().clone().requires_grad_(True)
    z = x @ gate.T
    p = torch.softmax((z + _gumbel_like(z, 3)) / tau, -1)
    idx = p.topk(2, -1).indices
    assert torch.equal(r.indices, idx)
    soft = p.gather(1, idx)
    ref = (soft - soft.detach()) + 1.0 if hard else soft
    torch.testing.assert_close(r.weights, ref)
    (ref * loss_w).sum().backward()
    torch.testing.assert_close(router.gate.weight.grad, gate.grad)
    if hard:
        assert torch.equal(r.weights.detach(), torch.ones(8, 2))


def test_soft_weights_gradcheck_float64_with_fixed_noise():
    router = _router(seed=4, tau=0.7, normalize=True)
    est = router.estimator
    x = torch.randn(3, 5, dtype=torch.float64)

    def f(z):
        est.generator.manual_seed(4)  # the same noise on every call
        return est.route(x, z, torch.softmax(z, -1), router).weights

    z = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (z,))


def test_temperature_to_zero_gives_hard_top1_of_the_sample():
    router = _router(seed=5, tau=1e-4, top_k=3)
    r = router(torch.randn(20, 5))
    w = r.weights.detach()
    torch.testing.assert_close(w[:, 0], torch.ones(20), atol=1e-4, rtol=0)
    torch.testing.assert_close(w[:, 1:], torch.zeros(20, 2), atol=1e-4, rtol=0)


def test_top1_sampling_frequencies_follow_softmax():
    """Gumbel-max: P(i selected) = softmax(z)_i."""
    router = _router(seed=6, top_k=1)
    x = torch.randn(1, 5).expand(20000, 5)
    r = router(x)
    freq = torch.bincount(r.indices[:, 0], minlength=6).float() / 20000
    p = r.scores[0].detach()
    se = (p * (1 - p) / 20000).sqrt()
    assert torch.all((freq - p).abs() < 5 * se + 1e-4), (freq, p)


def test_top2_without_replacement_pair_probability():
    """Gumbel-top-k samples without replacement: P(first=i, second=j) = p_i p_j / (1 - p_i)."""
    router = _router(seed=7, top_k=2)
    x = torch.randn(1, 5).expand(20000, 5)
    r = router(x)
    p = r.scores[0].detach()
    i, j = torch.argsort(p, descending=True)[:2].tolist()
    hit = ((r.indices[:, 0] == i) & (r.indices[:, 1] == j)).float().mean()
    expected = p[i] * p[j] / (1 - p[i])
    assert abs(float(hit - expected)) < 5 * float((expected * (1 - expected) / 20000).sqrt())


def test_eval_is_deterministic_topk_of_scores():
    router = _router(seed=8, tau=2.0)
    router.eval()
    x = torch.randn(10, 5)
    a, b = router(x), router(x)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    assert torch.equal(a.indices, a.scores.topk(2, -1).indices)
    torch.testing.assert_close(a.weights, torch.softmax(a.logits / 2.0, -1).gather(1, a.indices))
