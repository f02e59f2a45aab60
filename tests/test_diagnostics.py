"""moegrad.diagnostics: the exact expected gradient, estimator fidelity and routing health."""

import itertools

import pytest
import torch

import moegrad
from moegrad.diagnostics import (LoadWindow, cosine, dense_mixture_loss, expected_loss,
                                 expert_load, gradient_fidelity, load_cv, max_violation, purity,
                                 reference_gradients, router_entropy, routing_health,
                                 subset_probabilities)


def _problem(t=5, e=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(t, e, generator=g, dtype=torch.float64)
    every = torch.randn(t, e, d, generator=g, dtype=torch.float64)
    target = torch.randn(t, d, generator=g, dtype=torch.float64)
    return z, every, target


def test_subset_probabilities_match_gumbel_top_k_sampling():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 5, generator=g, dtype=torch.float64)
    sets, probs = subset_probabilities(z, 2)
    assert sets.shape == (10, 2) and torch.allclose(probs.sum(-1), torch.ones(1, dtype=torch.float64))
    n = 40000
    u = torch.rand(n, 5, generator=g, dtype=torch.float64)
    picks = (z - torch.log(-torch.log(u))).topk(2, dim=-1).indices.sort(-1).values
    index = {tuple(s): m for m, s in enumerate(sets.tolist())}
    freq = torch.bincount(torch.tensor([index[tuple(p)] for p in picks.tolist()]), minlength=10)
    assert torch.allclose(freq.double() / n, probs[0], atol=0.01)


def test_subset_probabilities_for_k_equal_e_and_k_one():
    z = torch.randn(3, 4, dtype=torch.float64)
    p = torch.softmax(z, -1)
    sets, probs = subset_probabilities(z, 4)
    assert sets.tolist() == [[0, 1, 2, 3]] and torch.allclose(probs, torch.ones(3, 1, dtype=torch.float64))
    sets, probs = subset_probabilities(z, 1)
    assert torch.allclose(probs, p)
    sets, probs = subset_probabilities(torch.tensor([[0.0, -200.0, -300.0]], dtype=torch.float64), 2)
    assert torch.allclose(probs, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))  # no 0/0


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_expected_gradient_matches_finite_differences(normalize, score):
    z, every, target = _problem()
    loss = lambda y: ((y - target) ** 2).sum(-1)  # noqa: E731
    z = z.requires_grad_(True)
    f = lambda zz: expected_loss(zz, every, loss, 2, tau=0.7, score=score, normalize=normalize)  # noqa: E731
    (grad,) = torch.autograd.grad(f(z), z)
    fd = torch.zeros_like(z)
    h = 1e-6
    for idx in itertools.product(range(z.shape[0]), range(z.shape[1])):
        zp, zm = z.detach().clone(), z.detach().clone()
        zp[idx] += h
        zm[idx] -= h
        fd[idx] = (f(zp) - f(zm)) / (2 * h)
    assert torch.allclose(grad, fd, atol=1e-8, rtol=1e-6)
    assert float(grad.abs().max()) > 1e-3


def test_expected_gradient_k1_closed_form():
    """k=1: J = mean_t sum_i p_i L(w_i e_i), p = softmax(z/tau), s = softmax(z), w_i = s_i
    (or 1 renormalised): dJ/dz_j = [p_j (L_j - Lbar) / tau + sum_i p_i <dL/dy_i, e_i> s_i (d_ij - s_j)] / T."""
    z, every, target = _problem(t=6, e=5, d=4, seed=3)
    tau, t = 0.5, z.shape[0]
    loss = lambda y: ((y - target) ** 2).sum(-1)  # noqa: E731
    p, s = torch.softmax(z / tau, -1), torch.softmax(z, -1)
    for normalize in (True, False):
        w = torch.ones_like(s) if normalize else s
        y = w[..., None] * every  # [T, E, D]: output when expert i is chosen
        losses = ((y - target[:, None]) ** 2).sum(-1)  # [T, E]
        lbar = (p * losses).sum(-1, keepdim=True)
        closed = p * (losses - lbar) / tau
        if not normalize:
            dl_ds = (2 * (y - target[:, None]) * every).sum(-1)  # [T, E]: <dL/dy_i, e_i>
            a = p * dl_ds
            closed = closed + s * a - s * (a * s).sum(-1, keepdim=True)
        closed = closed / t
        zz = z.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(expected_loss(zz, every, loss, 1, tau=tau, normalize=normalize), zz)
        assert torch.allclose(grad, closed, atol=1e-12), normalize


def test_expected_loss_tends_to_top_k_loss_as_tau_goes_to_zero():
    z, every, target = _problem(seed=5)
    loss = lambda y: ((y - target) ** 2).sum(-1)  # noqa: E731
    top = z.topk(2, -1).indices
    w = torch.softmax(z, -1).gather(1, top)
    y = (w[..., None] * every.gather(1, top[..., None].expand(-1, -1, 3))).sum(1)
    assert torch.allclose(expected_loss(z, every, loss, 2, tau=1e-4), loss(y).mean(), atol=1e-9)
    assert not torch.allclose(expected_loss(z, every, loss, 2, tau=1.0), loss(y).mean(), atol=1e-3)


def test_expected_loss_rejects_bad_input():
    z, every, target = _problem()
    loss = lambda y: ((y - target) ** 2).sum(-1)  # noqa: E731
    with pytest.raises(ValueError, match="tau"):
        expected_loss(z, every, loss, 2, tau=0.0)
    with pytest.raises(ValueError, match="top_k"):
        expected_loss(z, every, loss, 5)
    with pytest.raises(ValueError, match="expert_outputs"):
        expected_loss(z, every[:, :3], loss, 2)
    with pytest.raises(ValueError, match="score"):
        expected_loss(z, every, loss, 2, score="relu")


def _moe_problem(normalize, top_k=1, seed=0):
    torch.manual_seed(seed)
    moe = moegrad.MoE(8, 16, 4, top_k, normalize=normalize, losses={})
    x = torch.randn(128, 8)
    target = 0.3 * torch.randn(128, 8)
    return moe, x, lambda y: ((y - target.to(y.dtype)) ** 2).sum(-1)


def test_reference_gradients_match_the_dense_mixture_autograd():
    moe, x, loss = _moe_problem(False)
    ref = reference_gradients(moe, x, loss)
    z = (x.double() @ moe.router.gate.weight.double().T).requires_grad_(True)
    every = moe.experts.every_expert(x.double(), *(w.double() for w in moe.experts.stacked_weights()))
    (g,) = torch.autograd.grad(dense_mixture_loss(z, every.detach(), loss), z)
    assert torch.allclose(ref.logits_dense, g, atol=1e-12)
    assert torch.allclose(ref.gate_exact, ref.logits_exact.T @ x.double(), atol=1e-10)


def test_diagnostics_see_the_top1_renormalised_failure():
    """Top-1 with renormalised weights: the gate is the constant 1, topk's router gradient is 0."""
    moe, x, loss = _moe_problem(True)
    report = gradient_fidelity(moe, x, loss, ["topk", "dense", "unweighted"])
    assert report["topk"].zero and report["topk"].cos_exact == 0.0 and report["topk"].cos_dense == 0.0
    assert report["unweighted"].zero and report["unweighted"].cos_exact == 0.0
    assert not report["dense"].zero
    assert report["dense"].cos_exact > 0.1 and report["dense"].cos_dense > 0.2
    # without renormalisation topk does get a gradient, aligned with the exact one
    plain = gradient_fidelity(*_moe_problem(False), ["topk"])
    assert plain["topk"].cos_exact > 0.3


def test_dense_estimator_equals_dense_mixture_gradient_when_k_equals_e():
    """With K = E every expert is selected: topk's forward is the dense mixture, so its gradient
    and dense's equal the dense-mixture reference (and the exact one: S is certain)."""
    torch.manual_seed(2)
    moe = moegrad.MoE(6, 8, 3, 3, losses={})
    x, target = torch.randn(32, 6), torch.randn(32, 6)
    loss = lambda y: ((y - target.to(y.dtype)) ** 2).sum(-1)  # noqa: E731
    report = gradient_fidelity(moe, x, loss, ["topk", "dense"])
    for name in ("topk", "dense"):
        assert report[name].cos_dense > 0.99999 and report[name].rel_err_dense < 1e-4
        assert report[name].cos_exact > 0.99999


def test_stochastic_estimator_bias_variance_decomposition():
    moe, x, loss = _moe_problem(False, top_k=2, seed=4)
    report = gradient_fidelity(moe, x, loss, ["gumbel", "dense"], samples=8, seed=3)
    gumbel, dense = report["gumbel"], report["dense"]
    assert gumbel.samples == 8 and gumbel.variance > 0
    assert gumbel.mse == pytest.approx(gumbel.bias2 + gumbel.variance)
    assert dense.samples == 1 and dense.variance == 0.0
    assert dense.bias2 == pytest.approx(dense.rel_err_exact ** 2)
    again = gradient_fidelity(moe, x, loss, ["gumbel"], samples=8, seed=3)["gumbel"]
    assert again.cos_exact == gumbel.cos_exact  # seeded: deterministic


def test_health_metrics_on_hand_made_routings():
    idx = torch.tensor([[0], [0], [1], [3]])
    load = expert_load(idx, 4)
    assert load.tolist() == [0.5, 0.25, 0.0, 0.25]
    assert load_cv(load) == pytest.approx(float(torch.tensor([0.5, 0.25, 0.0, 0.25]).std(unbiased=False) / 0.25))
    assert max_violation(load) == pytest.approx(1.0)
    assert load_cv(torch.ones(4)) == 0.0 and max_violation(torch.ones(4)) == 0.0
    assert router_entropy(torch.full((3, 4), 0.25)) == pytest.approx(1.0)
    assert router_entropy(torch.eye(4)) == pytest.approx(0.0, abs=1e-12)
    truth = torch.tensor([0, 0, 1, 1, 2, 2])
    assert purity(torch.tensor([5, 5, 2, 2, 0, 1]), truth, 6, 3) == 1.0
    assert purity(torch.zeros(6, dtype=torch.long), truth, 6, 3) == pytest.approx(1 / 3)
    assert purity(torch.tensor([0, 0, 0, 0, 1, 1]), truth, 6, 3) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="first_choice"):
        purity(torch.zeros(3, dtype=torch.long), truth, 6, 3)


def test_load_window_counts_dead_experts():
    w = LoadWindow(4, window=2)
    w.update(torch.tensor([3, 0, 1, 0]))
    assert not w.full and w.dead == 2
    w.update(torch.tensor([0, 2, 0, 0]))
    assert w.full and w.dead == 1 and w.counts.tolist() == [3, 2, 1, 0]
    w.update(torch.tensor([0, 0, 0, 5]))  # the first step leaves the window
    assert w.dead == 2
    with pytest.raises(ValueError, match="counts"):
        w.update(torch.zeros(3))
    with pytest.raises(ValueError, match="window"):
        LoadWindow(4, window=0)


def test_routing_health_of_a_real_router():
    torch.manual_seed(0)
    router = moegrad.Router(4, 3, 1)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(3, 4) * 10)
    x = torch.eye(4)[:3].repeat(4, 1)  # token t is one-hot on t % 3
    health = routing_health(router(x), truth=torch.arange(12) % 3)
    assert health["purity"] == 1.0 and health["load_cv"] == pytest.approx(0.0)
    assert health["idle"] == 0 and health["entropy"] < 0.01
    assert cosine(torch.zeros(3), torch.ones(3)) == 0.0
