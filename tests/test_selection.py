"""moegrad.selection: the top-k selection and combine weights an estimator routes with.

Shapes: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import pytest
import torch

import moegrad
from moegrad.estimators import Estimator, Picked
from moegrad.selection import Selection, sinkhorn


def _reference_topk(scores, bias, n_group, topk_group, k):
    """Group-limited top-k written out token by token (DeepSeek-V3's rule)."""
    out = []
    for s in scores + (0 if bias is None else bias):
        if n_group:
            groups = s.view(n_group, -1)
            best = groups.topk(2, dim=-1).values.sum(-1)
            keep = set(best.topk(topk_group).indices.tolist())
            s = torch.stack([v if i // groups.shape[1] in keep else torch.tensor(float("-inf"))
                             for i, v in enumerate(s)])
        out.append(s.topk(k).indices)
    return torch.stack(out)


@pytest.mark.parametrize("grouped", [False, True])
def test_selection_equals_the_written_out_rule_and_the_router_delegates_to_it(grouped):
    gen = torch.Generator().manual_seed(0)
    kw = dict(n_group=4, topk_group=2) if grouped else {}
    router = moegrad.Router(6, 8, 3, score="sigmoid", normalize=True, routed_scaling_factor=2.5,
                            selection_bias=True, **kw)
    router.bias.copy_(torch.randn(8, generator=gen) * 0.3)
    scores = torch.rand(11, 8, generator=gen)
    sel = router.selection()
    assert isinstance(sel, Selection) and sel.bias is router.bias and sel.config is router.config
    indices = sel.select_topk(scores)
    expect = _reference_topk(scores, router.bias, kw.get("n_group"), kw.get("topk_group"), 3)
    assert torch.equal(indices, expect) and torch.equal(router.select_topk(scores), expect)
    w = sel.combine_weights(scores, indices)
    s = scores.gather(1, indices)
    torch.testing.assert_close(w, 2.5 * s / s.sum(-1, keepdim=True))
    torch.testing.assert_close(router.combine_weights(scores, indices), w)
    assert (sel.num_experts, sel.top_k) == (8, 3)


def test_an_estimator_written_against_the_router_names_works_with_a_selection():
    """route() once received the router; an estimator reading config, num_experts, top_k,
    select_topk and combine_weights gives the same routing with a Selection."""

    class Halved(Estimator):
        name = "halved_test"

        def route(self, x, z, scores, router):
            assert router.num_experts == router.config.num_experts and router.top_k == 2
            indices = router.select_topk(scores)
            return Picked(indices, router.combine_weights(scores, indices) / 2)

    torch.manual_seed(0)
    router = moegrad.Router(4, 5, 2)
    router.estimator = Halved(router.config)
    x = torch.randn(7, 4)
    r = router(x)
    s = torch.softmax(router.gate(x), -1)
    top = s.topk(2, dim=-1)
    assert torch.equal(r.indices, top.indices)
    torch.testing.assert_close(r.weights, top.values / 2)
    with pytest.raises(AttributeError, match="Selection"):
        _ = router.selection().gate


# ----------------------------------------------------------------------------- Sinkhorn selection
def _megatron_sinkhorn(cost, tol=1e-4):
    """A transcription of Megatron-Core's ``moe_utils.sinkhorn`` (megatron/core/transformer/moe/
    moe_utils.py): exp of the logits, d0 rows to 1/T, d1 columns to 1/E, eps 1e-8, until the
    mean |change of d1| <= tol, no iteration cap. moegrad's :func:`moegrad.selection.sinkhorn`
    differs in taking the scores rather than exp(logits) (the same P for softmax scores, another
    one for sigmoid scores) and in capping the iterations (SINKHORN_MAX_ITERS)."""
    cost = torch.exp(cost)
    d0 = torch.ones(cost.size(0), dtype=cost.dtype)
    d1 = torch.ones(cost.size(1), dtype=cost.dtype)
    eps, error, d1_old = 1e-8, 1e9, d1
    while error > tol:
        d0 = (1 / d0.size(0)) * 1 / (torch.sum(d1 * cost, 1) + eps)
        d1 = (1 / d1.size(0)) * 1 / (torch.sum(d0.unsqueeze(1) * cost, 0) + eps)
        error = torch.mean(torch.abs(d1_old - d1))
        d1_old = d1
    return d1 * cost * d0.unsqueeze(1)


def _balanced(scores, tol=1e-4, max_iters=1000):
    """Sinkhorn written as alternating normalisation of the matrix itself: rows to 1/T, then
    columns to 1/E, stopping when the mean change of the accumulated column factors is <= tol
    (the same rule as the scaling vectors of Megatron/moegrad, reached another way)."""
    t, e = scores.shape
    p = scores.clone()
    cols = torch.ones(e, dtype=scores.dtype)
    for _ in range(max_iters):
        p = p / p.sum(1, keepdim=True) / t
        factor = 1.0 / (e * p.sum(0))
        p = p * factor
        change = (cols * factor - cols).abs().mean()
        cols = cols * factor
        if change <= tol:
            break
    return p


def _skewed_logits(t=64, e=8, seed=0):
    """[T, E] logits whose plain top-k overloads experts 0 and 1."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(t, e, generator=gen)
    z[:, :2] += 2.0
    return z


def test_sinkhorn_is_doubly_stochastic_and_equals_the_written_out_normalisation():
    z = _skewed_logits().double()
    s = torch.softmax(z, -1)
    p = sinkhorn(s, tol=1e-12)
    t, e = s.shape
    torch.testing.assert_close(p.sum(0), torch.full((e,), 1 / e, dtype=p.dtype))
    torch.testing.assert_close(p.sum(1), torch.full((t,), 1 / t, dtype=p.dtype))
    torch.testing.assert_close(p, _balanced(s, tol=1e-12))
    # the default tolerance: columns exact, rows within 2% of 1/T
    q = sinkhorn(s.float())
    torch.testing.assert_close(q.sum(0), torch.full((e,), 1 / e), rtol=1e-5, atol=0)
    assert float((q.sum(1) * t - 1).abs().max()) < 0.02
    torch.testing.assert_close(q, _balanced(s.float()), rtol=1e-4, atol=1e-9)


def test_sinkhorn_equals_megatron_for_softmax_scores_and_differs_for_sigmoid():
    z = _skewed_logits(seed=1).double()
    torch.testing.assert_close(sinkhorn(torch.softmax(z, -1)), _megatron_sinkhorn(z),
                               rtol=1e-6, atol=1e-12)
    assert torch.equal(sinkhorn(torch.softmax(z, -1)).topk(2).indices,
                       _megatron_sinkhorn(z).topk(2).indices)
    # sigmoid scores: moegrad balances sigmoid(z), Megatron exp(z) (the same as our rule on
    # the cost exp(log sigmoid(z)) only through a different matrix)
    ours = sinkhorn(torch.sigmoid(z))
    torch.testing.assert_close(ours, _megatron_sinkhorn(torch.nn.functional.logsigmoid(z)),
                               rtol=1e-6, atol=1e-12)
    assert not torch.allclose(ours, _megatron_sinkhorn(z), rtol=1e-3)


def test_sinkhorn_balances_the_real_tokens_only():
    """Padding rows carry no mass: the real rows of P equal the balancing of the real rows alone,
    and a router with a mask selects for its real tokens what it would without the padding."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.softmax(torch.randn(40, 8, generator=gen) * 2, -1)
    mask = torch.rand(40, generator=gen) > 0.5
    scores[~mask] = torch.softmax(torch.tensor([5.0, 4.0, 0, 0, 0, 0, 0, 0]), -1)  # identical pads
    balanced = sinkhorn(scores, mask=mask)
    torch.testing.assert_close(balanced[mask], sinkhorn(scores[mask]))
    assert not balanced[~mask].any()
    assert not sinkhorn(scores, mask=torch.zeros(40, dtype=torch.bool)).any()
    router = moegrad.Router(6, 8, 2, routing="sinkhorn").train()
    x = torch.randn(40, 6, generator=gen)
    x[~mask] = x[~mask][0]  # identical padding vectors, as a padded batch has
    masked = router(x, mask).indices[mask]
    alone = router(x[mask]).indices
    assert torch.equal(masked, alone)


def test_sinkhorn_of_no_tokens_is_empty():
    assert sinkhorn(torch.zeros(0, 4)).shape == (0, 4)


@pytest.mark.parametrize("score,normalize,scale", [("softmax", False, 1.0), ("sigmoid", True, 2.5)])
def test_sinkhorn_router_selects_top_k_of_the_balanced_scores_in_training_only(score, normalize,
                                                                               scale):
    torch.manual_seed(0)
    router = moegrad.Router(6, 8, 2, routing="sinkhorn", score=score, normalize=normalize,
                            routed_scaling_factor=scale)
    with torch.no_grad():
        router.gate.weight.mul_(3.0)
        router.gate.weight[:2] += 1.0  # experts 0, 1 favoured
    x = torch.randn(64, 6) + 0.5
    r = router(x)
    s = torch.sigmoid(r.logits) if score == "sigmoid" else torch.softmax(r.logits, -1)
    torch.testing.assert_close(r.scores, s)
    expect = _balanced(s.detach()).topk(2, dim=-1).indices
    assert torch.equal(r.indices, expect)
    plain = s.detach().topk(2, dim=-1).indices
    assert not torch.equal(r.indices, plain)
    # more balanced than plain top-k: the busiest expert gets fewer pairs
    busiest = [int(torch.bincount(i.reshape(-1), minlength=8).max()) for i in (r.indices, plain)]
    assert busiest[0] < busiest[1]
    # the weights are the router's own scores at S (combine rule of topk), gradient included
    w = s.gather(1, r.indices)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    torch.testing.assert_close(r.weights, scale * w)
    g = torch.randn(64, 2)
    (gr,) = torch.autograd.grad((r.weights * g).sum(), router.gate.weight, retain_graph=True)
    (ge,) = torch.autograd.grad((scale * w * g).sum(), router.gate.weight)
    torch.testing.assert_close(gr, ge)
    # eval mode: plain top-k
    router.eval()
    assert torch.equal(router(x).indices, plain)
    assert router.selection().training is False


def test_sinkhorn_with_group_limited_top_k_masks_groups_of_the_balanced_matrix():
    gen = torch.Generator().manual_seed(3)
    router = moegrad.Router(6, 8, 3, routing="sinkhorn", n_group=4, topk_group=2)
    scores = torch.softmax(torch.randn(32, 8, generator=gen) * 2, -1)
    got = router.selection().select_topk(scores)
    expect = _reference_topk(_balanced(scores), None, 4, 2, 3)
    assert torch.equal(got, expect)


SINKHORN_ESTIMATORS = ["topk", "unweighted", "straight_through", "dense", "default_moe"]


@pytest.mark.parametrize("estimator", SINKHORN_ESTIMATORS)
def test_moe_with_sinkhorn_runs_forward_and_backward_for_each_deterministic_estimator(estimator):
    torch.manual_seed(0)
    moe = moegrad.MoE(8, 16, 4, 2, routing="sinkhorn", estimator=estimator)
    x = torch.randn(2, 16, 8, requires_grad=True)
    out = moe(x)
    s = out.routing.scores.detach()
    assert torch.equal(out.routing.indices, _balanced(s).topk(2, dim=-1).indices)
    (out.y.square().mean() + out.aux_loss).backward()
    grad = moe.router.gate.weight.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    assert bool(torch.isfinite(x.grad).all())
    assert int(moe.router.load_counts.sum()) == 32 * 2


@pytest.mark.parametrize("estimator", ["gumbel", "noisy_topk", "sparsemixer"])
def test_sampling_estimators_refuse_sinkhorn(estimator):
    with pytest.raises(ValueError, match="samples its selection.*routing='sinkhorn'"):
        moegrad.MoE(8, 16, 4, 2, routing="sinkhorn", estimator=estimator)


def test_topk_routing_is_the_default_and_unchanged():
    torch.manual_seed(0)
    a = moegrad.MoE(8, 16, 4, 2)
    torch.manual_seed(0)
    b = moegrad.MoE(8, 16, 4, 2, routing="topk")
    x = torch.randn(16, 8)
    assert a.router.config.routing == "topk" and "routing" not in repr(a)
    assert torch.equal(a(x).y, b(x).y)
    assert "routing=sinkhorn" in repr(moegrad.MoE(8, 16, 4, 2, routing="sinkhorn"))


@pytest.mark.parametrize("estimator", SINKHORN_ESTIMATORS)
def test_a_patched_hf_model_routes_with_sinkhorn_in_training_and_keeps_its_eval_forward(estimator):
    pytest.importorskip("transformers")
    import moegrad.hf as mh
    from tests.hf.models import ids, tiny

    reference = tiny("qwen3_moe")
    changes = estimator in ("unweighted", "straight_through")  # unit weights forward
    if changes:
        with pytest.raises(ValueError, match="would change the forward.*Estimators that keep it: "
                                             r"\['default_moe', 'dense', 'topk'\]"):
            mh.patch(tiny("qwen3_moe"), estimator, routing="sinkhorn")
    model = mh.patch(tiny("qwen3_moe"), estimator, routing="sinkhorn", losses={"switch": 1e-2},
                     allow_forward_change=changes)
    router = mh.routers(model)[0]
    assert router.config.routing == "sinkhorn"
    if not changes:
        with torch.no_grad():  # eval: plain top-k, the family's own forward
            torch.testing.assert_close(model(ids()).logits, reference(ids()).logits)
    model.train()
    x = torch.randn(20, router.config.dim)
    r = router(x)
    assert torch.equal(r.indices, _balanced(r.scores.detach()).topk(2, dim=-1).indices)
    out = model(ids(), labels=ids())
    out.loss.backward()
    grad = router.gate.weight.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_hf_patch_refuses_sinkhorn_where_it_cannot_apply():
    pytest.importorskip("transformers")
    import moegrad.hf as mh
    from tests.hf.models import tiny

    with pytest.raises(ValueError, match="routing='sinkhorn' with selection_bias"):
        mh.patch(tiny("deepseek_v3"), routing="sinkhorn")
    with pytest.raises(ValueError, match="samples its selection.*routing='sinkhorn'"):
        mh.patch(tiny("qwen3_moe"), "gumbel", routing="sinkhorn", allow_forward_change=True)
    with pytest.raises(ValueError, match=r"routing='remoe' is not supported by moegrad.hf.patch.*"
                                         r"\['sinkhorn', 'topk'\]"):
        mh.patch(tiny("qwen3_moe"), routing="remoe")


# ----------------------------------------------------------------------------- expert choice


def _expert_choice_reference(x, gate, experts, k, capacity_factor=None, mask=None, scale=1.0,
                             score="softmax"):
    """Zhou et al. 2022 written out expert by expert: s = softmax(x W^T) [T, E]; c =
    min(ceil(f T_real K / E), T_real); for e: the top-c real tokens by s[:, e] (ties: earlier
    token) each add r * s_te * E_e(x_t). Returns (y [T, D], chosen [T, E] bool, c)."""
    import math

    t, e = x.shape[0], gate.shape[0]
    logits = x @ gate.T
    s = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    real = list(range(t)) if mask is None else [i for i in range(t) if bool(mask[i])]
    c = min(math.ceil((1.0 if capacity_factor is None else capacity_factor) * len(real) * k / e),
            len(real))
    y = torch.zeros_like(x)
    chosen = torch.zeros(t, e, dtype=torch.bool)
    for j in range(e):
        order = sorted(real, key=lambda i: (-float(s[i, j].detach()), i))[:c]
        for i in order:
            chosen[i, j] = True
            y = y.index_add(0, torch.tensor([i]), (scale * s[i, j] * experts(j, x[i:i + 1])))
    return y, chosen, c


def _expert_fn(moe):
    w = moe.experts.stacked_weights()

    def run(j, xi):  # SwiGLU expert j: (silu(x Wg^T) * x Wu^T) Wd^T
        return (torch.nn.functional.silu(xi @ w.gate[j].T) * (xi @ w.up[j].T)) @ w.down[j].T
    return run


@pytest.mark.parametrize("t,capacity_factor,scale,score", [
    (13, None, 1.0, "softmax"), (13, 1.5, 2.0, "softmax"), (7, 0.3, 1.0, "sigmoid"),
    (3, 4.0, 1.0, "softmax")])  # last: c = ceil(4*3*2/4) = 6 > T = 3, so every expert takes all
def test_expert_choice_equals_the_per_expert_loop_forward_and_gradients(t, capacity_factor, scale,
                                                                         score):
    torch.manual_seed(0)
    moe = moegrad.MoE(6, 10, 4, 2, routing="expert_choice", capacity_factor=capacity_factor,
                      routed_scaling_factor=scale, score=score).double()
    x = torch.randn(t, 6, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    gate = moe.router.gate.weight
    params = [gate, *moe.experts.parameters()]
    ref, chosen, c = _expert_choice_reference(x, gate, _expert_fn(moe), 2, capacity_factor,
                                              scale=scale, score=score)
    assert c == min(t, c) and torch.equal(out.routing.chosen, chosen)
    assert (chosen.sum(0) == c).all()  # every expert exactly c tokens (all T when T < c)
    torch.testing.assert_close(out.y, ref)
    g = torch.randn_like(ref)
    got = torch.autograd.grad((out.y * g).sum(), [x, *params])
    want = torch.autograd.grad((ref * g).sum(), [x, *params])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert got[1].abs().sum() > 0  # the router learns through the gathered scores
    assert torch.equal(out.stats.tokens_per_expert, torch.full((4,), c))
    assert int(out.stats.dropped) == 0
    assert int(out.stats.unrouted_tokens) == sum(1 for i in range(t) if not chosen[i].any())
    assert out.aux_loss.item() == 0.0 and out.losses == {}


def test_expert_choice_padding_is_never_chosen_and_capacity_counts_real_tokens():
    torch.manual_seed(1)
    moe = moegrad.MoE(6, 10, 4, 2, routing="expert_choice").double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, 4:] = False  # 10 real tokens: c = ceil(10 * 2 / 4) = 5 (18 tokens would give 9)
    x[~mask] = 100.0  # padding that would win every expert's choice if it were eligible
    out = moe(x, mask)
    flat_mask = mask.reshape(-1)
    ref, chosen, c = _expert_choice_reference(x.reshape(-1, 6), moe.router.gate.weight,
                                              _expert_fn(moe), 2, mask=flat_mask)
    assert c == 5 and torch.equal(out.routing.chosen, chosen)
    assert not out.routing.chosen[~flat_mask].any()
    torch.testing.assert_close(out.y.reshape(-1, 6), ref)
    assert (out.y.reshape(-1, 6)[~flat_mask] == 0).all()
    assert torch.equal(out.stats.tokens_per_expert, torch.full((4,), 5))
    unrouted = int((~chosen.any(1) & flat_mask).sum())
    assert int(out.stats.unrouted_tokens) == unrouted
    before = moe.router.load_counts.clone()
    moe(x, mask)
    assert torch.equal(moe.router.load_counts - before, torch.full((4,), 5))


def test_expert_choice_unrouted_tokens_and_several_experts_per_token():
    """A token that every expert scores highest gets all E experts; with c = 1 the others none."""
    moe = moegrad.MoE(4, 8, 4, 1, routing="expert_choice", capacity_factor=0.5, score="sigmoid")
    with torch.no_grad():  # c = ceil(0.5 * 8 * 1 / 4) = 1
        moe.router.gate.weight.copy_(torch.eye(4))
    x = torch.zeros(8, 4)
    x[3] = 5.0  # sigmoid(5) beats sigmoid(0) for every expert
    out = moe(x)
    assert out.routing.chosen[3].all() and int(out.routing.chosen.sum()) == 4
    assert int(out.stats.unrouted_tokens) == 7
    assert torch.equal(out.stats.tokens_per_expert, torch.ones(4, dtype=torch.int64))
    assert (out.y[torch.arange(8) != 3] == 0).all() and out.y[3].abs().sum() > 0


def test_expert_choice_eval_selects_as_training_and_z_loss_is_allowed():
    torch.manual_seed(3)
    moe = moegrad.MoE(6, 10, 4, 2, routing="expert_choice", losses={"z_loss": 1e-3})
    x = torch.randn(17, 6)
    train = moe(x)
    moe.eval()
    with torch.no_grad():
        ev = moe(x)
    assert torch.equal(train.routing.chosen, ev.routing.chosen)
    torch.testing.assert_close(train.y, ev.y)
    z = torch.logsumexp(train.routing.logits, -1).pow(2).mean()
    torch.testing.assert_close(train.losses["z_loss"], z)
    torch.testing.assert_close(train.aux_loss, 1e-3 * z)


def test_expert_choice_selection_rule_and_plan_with_per_pair_keep():
    from moegrad.dispatch import plan_dispatch
    gen = torch.Generator().manual_seed(4)
    router = moegrad.Router(6, 5, 2, routing="expert_choice", capacity_factor=1.3)
    scores = torch.rand(11, 5, generator=gen)
    chosen = router.selection().select_expert_choice(scores)
    c = -(-13 * 11 * 2 // 50)  # ceil(1.3 * 11 * 2 / 5) = ceil(5.72) = 6
    assert c == 6 and (chosen.sum(0) == c).all()
    for j in range(5):
        want = set(sorted(range(11), key=lambda i: -float(scores[i, j]))[:c])
        assert set(chosen[:, j].nonzero().flatten().tolist()) == want
    indices = torch.arange(5).expand(11, 5)
    plan = plan_dispatch(indices, scores * chosen, 5, keep=chosen)
    assert torch.equal(plan.routed, torch.full((5,), c)) and int(plan.dropped) == 0
    assert plan.pairs.shape[0] == 5 * c
    assert torch.equal(plan.tokens, chosen.T.nonzero()[:, 1])  # expert-major, tokens ascending
    with pytest.raises(ValueError, match=r"keep must be a bool tensor \[T=11\] or \[T, K=5\]"):
        plan_dispatch(indices, scores, 5, keep=chosen[:, :2])


def test_expert_choice_refusals():
    with pytest.raises(ValueError, match="capacity_factor=1.0 applies to routing='expert_choice' only"):
        moegrad.Router(8, 4, 2, capacity_factor=1.0)
    with pytest.raises(ValueError, match="estimator 'unweighted' with routing='expert_choice'"):
        moegrad.Router(8, 4, 2, routing="expert_choice", estimator="unweighted")
    with pytest.raises(ValueError, match=r"losses \['seq_aux', 'switch'\] with routing='expert_choice'"):
        moegrad.MoE(8, 16, 4, 2, routing="expert_choice", losses={"switch": 1.0, "seq_aux": 1.0})
    with pytest.raises(ValueError, match="routing='expert_choice' is not supported by moegrad.hf.patch"):
        import torch.nn as nn
        from moegrad.hf import patch
        patch(nn.Linear(2, 2), routing="expert_choice")
    assert moegrad.MoE(8, 16, 4, 2, routing="expert_choice").losses == {}
    assert moegrad.MoE(8, 16, 4, 2).losses == {"switch": 1e-2}
