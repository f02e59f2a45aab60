
import pytest
import torch

import moegrad
from moegrad.routing import RouterConfig


def test_hand_written_topk_backward_through_router():
    """softmax -> topk -> squared loss: autograd equals the backward written out by hand on Zhihu
    (zhihu.com/question/11071292653)."""
    dim, experts, k, bs = 16, 8, 2, 2
    label = torch.randn(bs, k)
    a = torch.randn(bs, dim, requires_grad=True)
    router = moegrad.Router(dim, experts, k)
    r = router(a)
    loss = (((r.weights - label) ** 2) / label.numel()).sum()
    loss.backward()

    with torch.no_grad():
        p = torch.softmax(a @ router.gate.weight.T, -1)
        v, idx = torch.topk(p, k, dim=-1)
        assert torch.equal(idx, r.indices)
        dv = 2 * (v - label) / label.numel()
        dp = torch.zeros(bs, experts)
        for i in range(bs):
            dp[i, idx[i]] = dv[i]
        dz = torch.zeros(bs, experts)
        for i in range(bs):
            jac = torch.diag(p[i]) - torch.outer(p[i], p[i])
            dz[i] = dp[i] @ jac
        d_a = dz @ router.gate.weight
        d_w = dz.T @ a
    torch.testing.assert_close(a.grad, d_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(router.gate.weight.grad, d_w, rtol=1e-5, atol=1e-7)


def test_scores_temperature_normalize_and_scaling():
    router = moegrad.Router(8, 6, 3, score="sigmoid", normalize=True, temperature=2.0,
                            routed_scaling_factor=2.5)
    x = torch.randn(5, 8)
    r = router(x)
    z = x @ router.gate.weight.T
    torch.testing.assert_close(r.logits, z)
    s = torch.sigmoid(z / 2.0)
    torch.testing.assert_close(r.scores, s)
    top = s.topk(3, dim=-1)
    assert torch.equal(r.indices, top.indices)
    torch.testing.assert_close(r.weights, 2.5 * top.values / top.values.sum(-1, keepdim=True))
    assert r.indices.dtype == torch.int64 and r.weights.dtype == torch.float32


def test_batch_input_is_flattened():
    router = moegrad.Router(4, 4, 2)
    x = torch.randn(3, 5, 4)
    r = router(x)
    assert r.logits.shape == (15, 4) and r.indices.shape == (15, 2) and r.shape == (3, 5)
    torch.testing.assert_close(r.logits, router(x.reshape(15, 4)).logits)


def _group_limited_ref(scores, bias, n_group, topk_group, k):
    """DeepSeek-V3 selection, token by token with Python lists."""
    out = []
    per = scores.shape[1] // n_group
    for row, in zip(scores + bias):
        groups = [sorted(row[g * per:(g + 1) * per].tolist(), reverse=True) for g in range(n_group)]
        gscore = [sum(g[:2]) for g in groups]
        keep = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        cand = [(row[i].item(), i) for i in range(len(row)) if i // per in keep]
        out.append([i for _, i in sorted(cand, reverse=True)[:k]])
    return torch.tensor(out)


def test_group_limited_topk_matches_deepseek_v3_rule():
    router = moegrad.Router(8, 16, 4, score="sigmoid", n_group=4, topk_group=2, normalize=True,
                            selection_bias=True)
    router.bias.copy_(torch.randn(16) * 0.1)
    x = torch.randn(40, 8)
    r = router(x)
    ref = _group_limited_ref(r.scores, router.bias, 4, 2, 4)
    assert torch.equal(r.indices, ref)
    # experts come from at most topk_group groups
    assert int((r.indices // 4).unique(dim=None).numel()) <= 4
    for row in r.indices // 4:
        assert row.unique().numel() <= 2


def test_selection_bias_changes_selection_not_weights():
    router = moegrad.Router(8, 4, 1, selection_bias=True)
    x = torch.randn(30, 8)
    before = router(x)
    router.bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    after = router(x)
    assert torch.all(after.indices == 0)
    # the weight is the unbiased score of the chosen expert
    torch.testing.assert_close(after.weights[:, 0], after.scores[:, 0])
    assert not torch.equal(before.indices, after.indices)


def test_load_counts_only_in_training_and_without_padding():
    router = moegrad.Router(4, 4, 2)
    x = torch.randn(2, 3, 4)
    router.eval()
    router(x)
    assert int(router.load_counts.sum()) == 0
    router.train()
    mask = torch.tensor([[True, True, False], [True, False, False]])
    r = router(x, mask=mask)
    expected = torch.bincount(r.indices[mask.reshape(-1)].reshape(-1), minlength=4)
    assert torch.equal(router.load_counts, expected)
    assert int(router.reset_load_counts().sum()) == 3 * 2 and int(router.load_counts.sum()) == 0


def test_low_precision_input_routes_in_fp32():
    router = moegrad.Router(8, 4, 2).to(torch.bfloat16)
    r = router(torch.randn(6, 8, dtype=torch.bfloat16))
    assert r.logits.dtype == torch.float32 and r.weights.dtype == torch.float32


def test_zero_tokens():
    r = moegrad.Router(8, 4, 2)(torch.zeros(0, 8))
    assert r.indices.shape == (0, 2) and r.weights.shape == (0, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=0), "top_k=0"),
    (dict(top_k=5), "top_k=5"),
    (dict(score="relu"), "score='relu'.*sigmoid.*softmax"),
    (dict(estimator="nope"), "estimator='nope'.*default_moe.*unweighted"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(n_group=3, topk_group=1), "n_group=3 must divide num_experts=4"),
    (dict(n_group=2), "needs both"),
    (dict(n_group=2, topk_group=1, top_k=3), "top_k=3 is more than"),
    (dict(estimator="gumbel", n_group=2, topk_group=1), "samples its selection"),
    (dict(estimator="gumbel", tau=-1.0), "tau=-1.0"),
    (dict(estimator="dense", chunk_tokens=0), "chunk_tokens=0"),
    (dict(estimator="default_moe", beta=1.0), "beta=1.0"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    args = dict(top_k=2)
    args.update(kwargs)
    k = args.pop("top_k")
    with pytest.raises(ValueError, match=match):
        moegrad.Router(8, 4, k, **args)


def test_unknown_estimator_option_is_a_type_error_listing_the_options():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['tua'\].*\['generator', 'hard', 'tau'\]"):
        moegrad.Router(8, 4, 2, estimator="gumbel", tua=1.0)
    with pytest.raises(TypeError, match="top_k must be an int"):
        RouterConfig(8, 4, 2.0)


def test_bad_inputs():
    router = moegrad.Router(8, 4, 2)
    with pytest.raises(ValueError, match="feature size 7 .* dim=8"):
        router(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating-point"):
        router(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[T, D\] or \[B, S, D\]"):
        router(torch.randn(8))
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="not finite for 1 of 3 tokens.*check_finite=False"):
        router(x)
    assert moegrad.Router(8, 4, 2, check_finite=False)(x).indices.shape == (3, 2)
    with pytest.raises(ValueError, match=r"mask has shape \(2,\).*\(3,\)"):
        router(torch.randn(3, 8), mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        router(torch.randn(3, 8), mask=torch.tensor([0.5, 1.0, 1.0]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(normalize="false"), "normalize must be True or False"),
    (dict(selection_bias="yes"), "selection_bias must be True or False"),
    (dict(estimator="gumbel", hard="false"), "hard must be True or False"),
    (dict(estimator="default_moe", forward_defaults="no"), "forward_defaults must be True or False"),
])
def test_flags_must_be_bools_not_truthy_strings(kwargs, match):
    with pytest.raises(TypeError, match=match):
        moegrad.Router(3, 4, 2, **kwargs)
