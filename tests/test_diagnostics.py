"""moegrad.diagnostics: the exact expected gradient, estimator fidelity and routing health."""

import copy
import itertools

import pytest
import torch

import moegrad
from moegrad.diagnostics import (LoadWindow, WeightRule, clone_with_estimator, cosine,
                                 dense_mixture_loss, estimator_gradients, expected_loss,
                                 expert_load, gradient_fidelity, load_cv, max_violation, purity,
                                 reference_gradients, router_entropy, routing_health,
                                 subset_probabilities, weight_rule)
from moegrad.experts import map_weights
from tests.conftest import every_expert_ref


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
@pytest.mark.parametrize("weights", ["score", "unit"])
def test_expected_gradient_matches_finite_differences(normalize, score, weights):
    """Score weights (topk's forward) and unit weights (straight_through, unweighted, hard
    gumbel: the gradient flows only through the subset probabilities)."""
    z, every, target = _problem()
    loss = lambda y: ((y - target) ** 2).sum(-1)  # noqa: E731
    z = z.requires_grad_(True)
    f = lambda zz: expected_loss(zz, every, loss, 2, tau=0.7, score=score, normalize=normalize,  # noqa: E731
                                 scale=1.5, weights=weights)
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
    # unit weights w_i = c: only the score-function term, dJ/dz_j = p_j (L_j - Lbar) / (tau T)
    c = 1.5
    losses = ((c * every - target[:, None]) ** 2).sum(-1)  # [T, E]
    closed = p * (losses - (p * losses).sum(-1, keepdim=True)) / tau / t
    zz = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(expected_loss(zz, every, loss, 1, tau=tau, scale=c, weights="unit"), zz)
    assert torch.allclose(grad, closed, atol=1e-12)
    assert float(closed.abs().max()) > 1e-2


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
    with pytest.raises(ValueError, match="weights"):
        expected_loss(z, every, loss, 2, weights="hard")


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
    every = moe.experts.every_expert(x.double(), map_weights(torch.Tensor.double, moe.experts.stacked_weights()))
    (g,) = torch.autograd.grad(dense_mixture_loss(z, every.detach(), loss), z)
    assert torch.allclose(ref.logits_dense, g, atol=1e-12)
    assert torch.allclose(ref.gate_exact, ref.logits_exact.T @ x.double(), atol=1e-10)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_dense_reference_matches_its_closed_form(score):
    """y = c sum_i s_i e_i, s = score(l / temp), L = mean_t ||y_t - target_t||^2, g = dL/dy:
    softmax: dL/dl_i = c s_i (<g, e_i> - sum_j s_j <g, e_j>) / temp;
    sigmoid: dL/dl_i = c s_i (1 - s_i) <g, e_i> / temp. Experts evaluated one by one."""
    torch.manual_seed(1)
    temp, c = 2.0, 1.5
    moe = moegrad.MoE(8, 16, 4, 2, score=score, temperature=temp, routed_scaling_factor=c, losses={})
    x, target = torch.randn(64, 8, dtype=torch.float64), 0.3 * torch.randn(64, 8, dtype=torch.float64)
    ref = reference_gradients(moe, x, lambda y: ((y - target) ** 2).sum(-1))
    with torch.no_grad():
        every = every_expert_ref(x, copy.deepcopy(moe).double())  # [T, E, D]
        z = x @ moe.router.gate.weight.double().T / temp
        s = torch.softmax(z, -1) if score == "softmax" else torch.sigmoid(z)
    y = c * (s[..., None] * every).sum(1)
    g = 2 * (y - target) / x.shape[0]  # [T, D]
    ge = torch.einsum("td,ted->te", g, every)  # <g, e_i>
    if score == "softmax":
        closed = c * s * (ge - (s * ge).sum(-1, keepdim=True)) / temp
    else:
        closed = c * s * (1 - s) * ge / temp
    assert torch.allclose(ref.logits_dense, closed, atol=1e-12, rtol=1e-9)
    assert float(closed.abs().max()) > 1e-3


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
    """mse, bias2, variance and the per-sample cosine recomputed here from the raw sampled
    gradients g_r [R, T, E] and the exact reference g*: mse = mean_r ||g_r - g*||^2 / ||g*||^2."""
    moe, x, loss = _moe_problem(False, top_k=2, seed=4)
    report = gradient_fidelity(moe, x, loss, ["gumbel", "dense"], samples=8, seed=3)
    gumbel, dense = report["gumbel"], report["dense"]
    ref = reference_gradients(moe, x, loss)  # topk's rule: softmax weights, gumbel's (soft) too
    exact = ref.logits_exact
    norm2 = float((exact ** 2).sum())
    raw, _ = estimator_gradients(moe, x, loss, "gumbel", samples=8, seed=3)
    raw = raw.double()
    assert raw.shape == (8, 128, 4) and float(raw.std(0).max()) > 0  # really 8 different samples
    mse = sum(float(((g - exact) ** 2).sum()) for g in raw) / 8 / norm2
    gbar = raw.mean(0)
    bias2 = float(((gbar - exact) ** 2).sum()) / norm2
    variance = sum(float(((g - gbar) ** 2).sum()) for g in raw) / 8 / norm2
    per_sample = sum(float(torch.nn.functional.cosine_similarity(g.flatten(), exact.flatten(), dim=0))
                     for g in raw) / 8
    assert gumbel.samples == 8 and gumbel.variance > 0.1
    assert gumbel.mse == pytest.approx(mse, rel=1e-9)
    assert gumbel.bias2 == pytest.approx(bias2, rel=1e-9)
    assert gumbel.variance == pytest.approx(variance, rel=1e-9)
    assert gumbel.sample_cos_exact == pytest.approx(per_sample, rel=1e-9)
    assert gumbel.sample_cos_exact < gumbel.cos_exact  # one sample points worse than their mean
    (g_dense,), _ = estimator_gradients(moe, x, loss, "dense")
    assert dense.samples == 1 and dense.variance == 0.0
    assert dense.mse == pytest.approx(float(((g_dense.double() - exact) ** 2).sum()) / norm2, rel=1e-9)
    assert dense.sample_cos_exact == pytest.approx(dense.cos_exact, abs=1e-12)
    again = gradient_fidelity(moe, x, loss, ["gumbel"], samples=8, seed=3)["gumbel"]
    assert again.cos_exact == gumbel.cos_exact  # seeded: deterministic


def _deepseek_style(seed=0, **overrides):
    """Sigmoid scores, renormalised, scaled, tempered, group-limited top-k with a non-zero
    selection bias and a capacity limit that drops pairs: every option clone must carry."""
    torch.manual_seed(seed)
    kwargs = dict(score="sigmoid", normalize=True, temperature=1.7, routed_scaling_factor=2.5,
                  n_group=4, topk_group=2, selection_bias=True, capacity_factor=0.75,
                  activation="gelu", impl="loop", losses={"switch": 0.1})
    kwargs.update(overrides)
    moe = moegrad.MoE(8, 16, 8, 2, **kwargs)
    if moe.router.bias is not None:
        with torch.no_grad():
            moe.router.bias.copy_(torch.linspace(-0.4, 0.4, 8).flip(0))
    return moe


@pytest.mark.parametrize("estimator", ["topk", "dense", "straight_through"])
def test_clone_carries_every_router_and_layer_option(estimator):
    moe = _deepseek_style().eval()
    twin = clone_with_estimator(moe, estimator)
    assert twin.router.estimator.name == estimator and twin.losses == {} and not twin.training
    assert twin.router.config == moe.router.config  # score .. selection_bias, check_finite
    assert twin.router.config.n_group == 4 and twin.router.config.temperature == 1.7
    assert twin.capacity_factor == 0.75
    assert (twin.experts.impl, twin.experts.activation) == ("loop", "gelu")
    assert torch.equal(twin.router.bias, moe.router.bias) and float(twin.router.bias.abs().sum()) > 1
    for (name, a), (_, b) in zip(moe.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr() and b.requires_grad, name
    x = torch.randn(64, 8)
    ours, theirs = moe(x), twin(x)
    assert int(ours.stats.dropped) > 0 and int(theirs.stats.dropped) == int(ours.stats.dropped)
    assert torch.equal(theirs.routing.indices, ours.routing.indices)
    if estimator != "straight_through":  # same forward as topk
        assert torch.equal(theirs.y, ours.y)
    twin.router.bias.add_(1.0)  # a copy, not a view
    assert float(moe.router.bias[0]) == pytest.approx(0.4)


def test_clone_keeps_the_estimator_state_only_for_the_same_estimator():
    torch.manual_seed(0)
    moe = moegrad.MoE(8, 16, 4, 2, estimator="default_moe", beta=0.5, losses={})
    moe(torch.randn(64, 8))  # training mode: fills the EMA of default outputs
    assert bool(moe.router.estimator.seen.all())
    same = clone_with_estimator(moe, "default_moe")
    assert same.router.estimator.beta == 0.5
    assert torch.equal(same.router.estimator.defaults, moe.router.estimator.defaults)
    assert bool(same.router.estimator.seen.all())
    assert clone_with_estimator(moe, "default_moe", beta=0.8).router.estimator.beta == 0.8
    gumbel = moegrad.MoE(8, 16, 4, 2, estimator="gumbel", tau=0.5, hard=True, losses={})
    twin = clone_with_estimator(gumbel, "gumbel")
    assert (twin.router.estimator.tau, twin.router.estimator.hard) == (0.5, True)
    assert clone_with_estimator(gumbel, "topk").router.estimator.name == "topk"


@pytest.mark.parametrize("option, match", [({"n_group": 4, "topk_group": 2}, "n_group"),
                                           ({"selection_bias": True}, "selection_bias"),
                                           ({"capacity_factor": 1.0}, "capacity_factor")])
def test_exact_reference_refuses_what_it_cannot_model(option, match):
    torch.manual_seed(0)
    moe = moegrad.MoE(8, 16, 8, 2, losses={}, **option)
    x = torch.randn(16, 8)
    loss = lambda y: (y ** 2).sum(-1)  # noqa: E731
    with pytest.raises(ValueError, match=match) as info:
        reference_gradients(moe, x, loss)
    assert "supported: score, normalize, temperature" in str(info.value)
    with pytest.raises(ValueError, match=match):
        gradient_fidelity(moe, x, loss, ["dense"])


def test_exact_reference_models_the_supported_options():
    """score, normalize, temperature and routed_scaling_factor: the reference of a topk MoE
    equals the enumeration written here with those options, on logits z = x W^T / temp."""
    moe = _deepseek_style(n_group=None, topk_group=None, selection_bias=False, capacity_factor=None)
    x, target = torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 8, dtype=torch.float64)
    loss = lambda y: ((y - target) ** 2).sum(-1)  # noqa: E731
    ref = reference_gradients(moe, x, loss, tau=0.8)
    assert ref.rule == WeightRule("score", "sigmoid", True, 2.5)
    l = (x @ moe.router.gate.weight.double().T).requires_grad_(True)
    every = every_expert_ref(x, copy.deepcopy(moe).double()).detach()
    j = expected_loss(l / 1.7, every, loss, 2, tau=0.8, score="sigmoid", normalize=True, scale=2.5)
    (g,) = torch.autograd.grad(j, l)
    assert torch.allclose(ref.logits_exact, g, atol=1e-12) and float(g.abs().max()) > 1e-3
    assert ref.loss_exact == pytest.approx(j.item(), rel=1e-12)


def test_each_estimator_is_compared_with_its_own_forward_weights():
    labels = {}
    for name in moegrad.estimators.available():
        moe = moegrad.MoE(8, 16, 4, 2, estimator=name, routed_scaling_factor=2.0, losses={})
        labels[name] = weight_rule(moe.router.estimator).label
    assert labels == {"topk": "softmax weights x 2", "dense": "softmax weights x 2",
                      "default_moe": "softmax weights x 2", "straight_through": "unit weights x 2",
                      "unweighted": "unit weights", "gumbel": "softmax weights x 2",
                      "noisy_topk": "softmax weights renormalised over S x 2",
                      "sparsemixer": "softmax weights x 2"}
    hard = moegrad.MoE(8, 16, 4, 2, estimator="gumbel", hard=True, losses={})
    assert weight_rule(hard.router.estimator) == WeightRule("unit", scale=1.0)
    top1 = moegrad.MoE(8, 16, 4, 1, normalize=True, score="sigmoid", losses={})
    assert weight_rule(top1.router.estimator) == WeightRule("unit")  # s / s = 1

    # straight_through's cosine is taken against the unit-weight expected loss, written here
    moe, x, loss = _moe_problem(False, top_k=2, seed=6)
    fid = gradient_fidelity(moe, x, loss, ["straight_through", "topk"])
    assert fid["straight_through"].reference == "unit weights"
    assert fid["topk"].reference == "softmax weights"
    z = (x.double() @ moe.router.gate.weight.double().T).requires_grad_(True)
    every = every_expert_ref(x.double(), copy.deepcopy(moe).double()).detach()
    (unit,) = torch.autograd.grad(expected_loss(z, every, loss, 2, weights="unit"), z)
    (score,) = torch.autograd.grad(expected_loss(z, every, loss, 2), z)
    (g_st,), _ = estimator_gradients(moe, x, loss, "straight_through")
    assert fid["straight_through"].cos_exact == pytest.approx(cosine(g_st, unit), abs=1e-9)
    assert abs(cosine(g_st, unit) - cosine(g_st, score)) > 0.01  # the rule matters
    with pytest.raises(ValueError, match="weights"):
        WeightRule("hard")


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


def test_routing_health_under_expert_choice_counts_the_chosen_pairs():
    """Every expert takes exactly c tokens: a perfectly even load, whatever ``indices`` lists."""
    torch.manual_seed(0)
    router = moegrad.Router(8, 4, 2, routing="expert_choice")
    x, mask = torch.randn(12, 8), torch.arange(12) < 10
    r = router(x, mask)
    health = routing_health(r)
    assert health["load"] == [0.25] * 4 and health["max_violation"] == 0.0 and health["idle"] == 0
    expect = r.chosen.sum(0).double()
    assert torch.equal(torch.tensor(health["load"], dtype=torch.float64), expect / expect.sum())
    with pytest.raises(ValueError, match="purity needs each token's first expert"):
        routing_health(r, truth=torch.arange(12) % 3)


def test_clone_keeps_the_routing_and_refuses_remoe():
    torch.manual_seed(0)
    moe = moegrad.MoE(8, 16, 4, 2, routing="expert_choice", capacity_factor=1.5)
    twin = clone_with_estimator(moe, "topk")
    assert twin.router.config.routing == "expert_choice" and twin.router.config.capacity_factor == 1.5
    x = torch.randn(20, 8)
    assert torch.equal(twin(x).routing.chosen, moe(x).routing.chosen)
    with pytest.raises(ValueError, match="routing='remoe', which takes no estimator"):
        clone_with_estimator(moegrad.MoE(8, 16, 4, 2, routing="remoe"), "topk")
