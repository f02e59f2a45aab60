"""Balance losses against hand computations (the balancing state: tests/test_balancing.py)."""

import math

import pytest
import torch

import moegrad
from moegrad import losses


def _routing(t=12, e=6, k=2, shape=None, mask=None, **kw):
    torch.manual_seed(7)
    router = moegrad.Router(5, e, k, **kw)
    x = torch.randn(*(shape or (t,)), 5)
    return router, router(x, mask=mask)


def _hf_load_balancing(logits, k, e):
    """transformers' load_balancing_loss_func without attention mask, written out."""
    probs = torch.softmax(logits, -1)
    _, selected = torch.topk(probs, k, -1)
    mask = torch.nn.functional.one_hot(selected, e)  # [T, K, E]
    tokens_per_expert = mask.float().mean(0)  # [K, E]
    router_prob = probs.mean(0)  # [E]
    return (tokens_per_expert * router_prob[None]).sum() * e


def test_switch_equals_transformers_formula():
    _, r = _routing()
    torch.testing.assert_close(losses.switch_loss(r), _hf_load_balancing(r.logits, 2, 6))


def test_switch_against_transformers_function_when_installed():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    _, r = _routing(t=20, e=8, k=2)
    ref = mixtral.load_balancing_loss_func((r.logits,), num_experts=8, top_k=2)
    torch.testing.assert_close(losses.switch_loss(r), ref)


def test_switch_is_k_at_perfect_balance():
    router = moegrad.Router(4, 4, 1)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4) * 50)
    r = router(torch.eye(4))
    torch.testing.assert_close(losses.switch_loss(r), torch.tensor(1.0), atol=1e-3, rtol=0)


def test_switch_and_z_loss_exclude_padding():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    _, r = _routing(shape=(2, 3), mask=mask)
    keep = mask.reshape(-1)
    torch.testing.assert_close(losses.switch_loss(r), _hf_load_balancing(r.logits[keep], 2, 6))
    torch.testing.assert_close(losses.z_loss(r), torch.logsumexp(r.logits[keep], -1).square().mean())


def test_z_loss_by_hand():
    _, r = _routing()
    by_hand = sum(torch.log(torch.exp(row).sum()) ** 2 for row in r.logits) / r.logits.shape[0]
    torch.testing.assert_close(losses.z_loss(r), by_hand)


def test_importance_load_by_hand():
    router, r = _routing(estimator="noisy_topk", generator=torch.Generator().manual_seed(0))
    gates = torch.zeros(12, 6)
    for t in range(12):
        for j in range(2):
            gates[t, r.indices[t, j]] = r.weights[t, j]
    imp = gates.sum(0)
    load = r.load_probs.sum(0)

    def cv2(v):
        mean = v.mean()
        return ((v - mean) ** 2).mean() / mean ** 2

    torch.testing.assert_close(losses.importance_load_loss(r), cv2(imp) + cv2(load), rtol=1e-4, atol=1e-6)


def test_importance_load_needs_noisy_topk():
    _, r = _routing()
    with pytest.raises(ValueError, match="noisy_topk"):
        losses.importance_load_loss(r)
    with pytest.raises(ValueError, match="importance_load loss needs estimator='noisy_topk'.*'topk'"):
        moegrad.MoE(8, 8, 4, 2, losses={"importance_load": 1e-2})


def test_seq_aux_by_hand_loop():
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [False] * 4])
    _, r = _routing(shape=(3, 4), mask=mask, score="sigmoid", e=6, k=2)
    s = r.scores.view(3, 4, 6)
    idx = r.indices.view(3, 4, 2)
    per_seq = []
    for b in range(3):
        real = [t for t in range(4) if mask[b, t]]
        if not real:
            continue
        n = len(real)
        total = 0.0
        for i in range(6):
            count = sum(int(i in idx[b, t].tolist()) for t in real)
            f = 6 / (2 * n) * count
            p = sum(s[b, t, i] / s[b, t].sum() for t in real) / n
            total = total + f * p
        per_seq.append(total)
    torch.testing.assert_close(losses.seq_aux_loss(r), sum(per_seq) / len(per_seq))


def test_every_loss_is_zero_without_real_tokens():
    _, r = _routing(shape=(2, 3), mask=torch.zeros(2, 3, dtype=torch.bool))
    for name in ("switch", "z_loss", "seq_aux"):
        assert float(losses.LOSSES[name](r)) == 0.0


def test_moe_aux_loss_is_weighted_sum_and_differentiable():
    moe = moegrad.MoE(5, 8, 6, 2, losses={"switch": 0.5, "z_loss": 0.25, "seq_aux": 2.0})
    out = moe(torch.randn(2, 6, 5))
    expected = (0.5 * losses.switch_loss(out.routing) + 0.25 * losses.z_loss(out.routing)
                + 2.0 * losses.seq_aux_loss(out.routing))
    torch.testing.assert_close(out.aux_loss, expected)
    assert set(out.losses) == {"switch", "z_loss", "seq_aux"}
    out.aux_loss.backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0


def test_loss_configuration_errors():
    with pytest.raises(ValueError, match="loss 'aux' is unknown.*importance_load.*seq_aux.*switch.*z_loss"):
        moegrad.MoE(8, 8, 4, 2, losses={"aux": 1.0})
    with pytest.raises(ValueError, match=r"losses\['switch'\]=-1.0"):
        moegrad.MoE(8, 8, 4, 2, losses={"switch": -1.0})
    with pytest.raises(TypeError, match="losses must be a dict"):
        moegrad.MoE(8, 8, 4, 2, losses=["switch"])


def test_window_argument_errors():
    _, r = _routing()
    with pytest.raises(ValueError, match=r"window must be an int64 tensor of shape \[7\]"):
        losses.switch_loss(r, window=torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="only used by the switch loss"):
        losses.balance_losses(r, {"z_loss": 1.0}, window=torch.zeros(7, dtype=torch.int64))


def _routing_of(logits, indices, shape, noisy):
    """A Routing whose every differentiable field is a smooth function of ``logits`` (the
    selection ``indices`` and the noisy logits ``noisy`` held fixed: both are piecewise
    constant or sampled)."""
    from moegrad.estimators.noisy import smooth_load
    from moegrad.routing import Routing

    scores = torch.softmax(logits, -1)
    sigma = torch.nn.functional.softplus(logits) + 0.1
    return Routing(logits=logits, scores=scores, indices=indices,
                   weights=scores.gather(1, indices), shape=shape,
                   load_probs=smooth_load(logits, noisy, sigma, indices.shape[1]),
                   noise_std=sigma)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_every_loss_passes_gradcheck_in_float64(name):
    torch.manual_seed(11)
    logits = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    noisy = logits.detach() + torch.randn(8, 5, dtype=torch.float64) * 0.3
    indices = noisy.topk(2, -1).indices
    fn = losses.LOSSES[name]
    assert torch.autograd.gradcheck(lambda z: fn(_routing_of(z, indices, (2, 4), noisy)), (logits,))


# --------------------------------------------------------------------------- issue 11, item 7
def _logits_routing(logits, mask=None, k=2):
    from moegrad.routing import Routing

    scores = torch.softmax(logits, -1)
    idx = scores.topk(k, -1).indices
    return Routing(logits=logits, scores=scores, indices=idx, weights=scores.gather(1, idx),
                   shape=(logits.shape[0],), mask=mask)


def _z_reference(logits, mask=None):
    """mean over real tokens of logsumexp^2 with Python floats (fp64), written out, and its
    gradient 2 l_t / N softmax(z_t) [T, E] as a list of lists."""
    rows = logits.double().tolist()
    keep = [t for t in range(len(rows)) if mask is None or bool(mask[t])]
    lse = {}
    for t in keep:
        m = max(rows[t])
        lse[t] = m + math.log(sum(math.exp(v - m) for v in rows[t]))
    value = sum(lse[t] ** 2 for t in keep) / len(keep)
    grad = [[0.0] * len(r) for r in rows]
    for t in keep:
        m = max(rows[t])
        denom = sum(math.exp(v - m) for v in rows[t])
        grad[t] = [2 * lse[t] / len(keep) * math.exp(v - m) / denom for v in rows[t]]
    return value, torch.tensor(grad, dtype=torch.float64)


@pytest.mark.parametrize("masked", [False, True])
def test_z_loss_is_finite_and_exact_for_huge_finite_fp32_logits(masked):
    # |logsumexp| ~ 1.5e19: each square ~2e38 fits fp32 but their sum over 8 tokens does not
    torch.manual_seed(0)
    logits = (1.5e19 * (1 + 0.05 * torch.rand(8, 6))).requires_grad_()
    mask = torch.tensor([True, True, False, True, True, True, False, True]) if masked else None
    value = losses.z_loss(_logits_routing(logits, mask))
    ref_value, ref_grad = _z_reference(logits.detach(), mask)
    assert math.isfinite(float(value.detach()))
    assert abs(float(value.detach()) - ref_value) <= 1e-5 * ref_value
    (grad,) = torch.autograd.grad(value, logits)
    assert bool(torch.isfinite(grad).all())
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=0)


def test_z_loss_beyond_fp32_raises_naming_the_cause():
    logits = torch.full((4, 6), 1e20)
    with pytest.raises(ValueError, match=r"z_loss = mean_t logsumexp\(z_t\)\^2 = 1e\+40 exceeds the "
                                         r"float32 range \(3.4e\+38\).*\|logsumexp\| = 1e\+20"):
        losses.z_loss(_logits_routing(logits))
    # the same logits in fp64 (gradient checks) fit: no error, exact value
    value = losses.z_loss(_logits_routing(torch.full((4, 6), 1e20, dtype=torch.float64)))
    assert abs(float(value) - (1e20 + math.log(6)) ** 2) <= 1e-12 * 1e40
    # non-finite logits (check_finite=False) stay non-finite, as before: no claim about overflow
    bad = torch.randn(4, 6)
    bad[1, 2] = float("inf")
    assert not math.isfinite(float(losses.z_loss(_logits_routing(bad))))


def test_z_loss_compiles_with_its_checks_at_run_time():
    """Under torch.compile the overflow check is a custom op (no graph break): the same error,
    the same value, and 0 for a batch of padding only."""
    compiled = torch.compile(lambda logits, mask: losses.z_loss(_logits_routing(logits, mask)),
                             backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match=r"z_loss = mean_t logsumexp\(z_t\)\^2 = 1e\+40 exceeds the float32"):
        compiled(torch.full((4, 6), 1e20), None)
    logits, mask = torch.randn(5, 6), torch.tensor([True, False, True, True, False])
    torch.testing.assert_close(compiled(logits, mask), losses.z_loss(_logits_routing(logits, mask)))
    assert float(compiled(logits, torch.zeros(5, dtype=torch.bool))) == 0.0


def test_z_loss_under_expert_parallelism_decides_overflow_from_global_sums(monkeypatch):
    """The ``group`` path with the collectives replaced by a fake 2-rank group whose other rank
    holds the same tokens (sum over ranks = 2 x): this rank's share is the local mean."""
    monkeypatch.setattr(losses, "all_reduce_detached", lambda x, group=None: x.detach().clone() * 2)
    monkeypatch.setattr(losses, "group_size", lambda group=None: 2)
    torch.manual_seed(0)
    logits = (1.5e19 * (1 + 0.05 * torch.rand(8, 6))).requires_grad_()
    value = losses.z_loss(_logits_routing(logits), group=object())
    ref_value, ref_grad = _z_reference(logits.detach())
    assert abs(float(value.detach()) - ref_value) <= 1e-5 * ref_value
    (grad,) = torch.autograd.grad(value, logits)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="exceeds the float32 range"):
        losses.z_loss(_logits_routing(torch.full((4, 6), 1e20)), group=object())


def test_z_loss_gradcheck_float64_with_padding():
    torch.manual_seed(1)
    logits = (torch.randn(7, 5, dtype=torch.float64) * 30).requires_grad_()
    mask = torch.tensor([True, False, True, True, False, True, True])
    assert torch.autograd.gradcheck(lambda z: losses.z_loss(_logits_routing(z, mask)), (logits,))
    ref_value, ref_grad = _z_reference(logits.detach(), mask)
    value = losses.z_loss(_logits_routing(logits, mask))
    assert abs(float(value.detach()) - ref_value) <= 1e-12 * ref_value
    torch.testing.assert_close(torch.autograd.grad(value, logits)[0], ref_grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- issue 11, item 14
def _megatron_scores_for_aux_loss(logits, topk, score, padding_mask=None):
    """Megatron-Core ``compute_routing_scores_for_aux_loss`` (moe_utils.py), transcribed:
    -> (routing_map [T, E] bool, scores [T, E]); ``padding_mask`` True = padding."""
    if score == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    else:
        scores = torch.sigmoid(logits.float())
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    _, top_indices = torch.topk(scores, k=topk, dim=1)
    routing_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
    if padding_mask is not None:
        valid_mask = (~padding_mask).unsqueeze(-1)
        routing_map = routing_map * valid_mask
        scores = scores * valid_mask
    return routing_map, scores


def _megatron_switch(probs, tokens_per_expert, total_num_tokens, topk, num_experts):
    """Megatron-Core ``switch_load_balancing_loss_func`` (coefficient 1), transcribed."""
    aggregated_probs_per_expert = probs.sum(dim=0)
    return torch.sum(aggregated_probs_per_expert * tokens_per_expert) * (
        num_experts / (topk * total_num_tokens * total_num_tokens))


def _megatron_aux_loss(logits, topk, score, padding_mask=None, routing_map=None):
    """TopKRouter._apply_aux_loss on one rank: counts from ``get_tokens_per_expert_and_token_count``
    (with a padding mask the token count is sum(counts) / topk)."""
    aux_map, scores = _megatron_scores_for_aux_loss(logits, topk, score, padding_mask)
    routing_map = aux_map if routing_map is None else routing_map
    tokens_per_expert = routing_map.sum(dim=0)
    total = tokens_per_expert.sum() / topk if padding_mask is not None else routing_map.shape[0]
    return _megatron_switch(scores, tokens_per_expert, total, topk, logits.shape[1])


def _megatron_seq_aux_loss(logits, topk, score, seq_length, bsz, padding_mask=None):
    """TopKRouter._apply_seq_aux_loss on one rank. Megatron's tokens are sequence-major [S, B]:
    the batch is folded into the expert axis ([S, B*E]), counts with topk * bsz."""
    routing_map, scores = _megatron_scores_for_aux_loss(logits, topk, score, padding_mask)
    scores = scores.reshape(seq_length, -1)
    routing_map = routing_map.reshape(seq_length, -1)
    tokens_per_expert = routing_map.sum(dim=0)
    total = (tokens_per_expert.sum() / (topk * bsz) if padding_mask is not None else seq_length)
    return _megatron_switch(scores, tokens_per_expert, total, topk, logits.shape[1]) / bsz


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("masked", [False, True])
def test_switch_is_k_times_megatron_and_switch_megatron_equals_it(score, masked):
    mask = torch.tensor([[True] * 5 + [False] * 2, [True] * 3 + [False] * 4]) if masked else None
    _, r = _routing(shape=(2, 7), mask=mask, e=6, k=3, score=score)
    padding = None if mask is None else ~mask.reshape(-1)
    ref = _megatron_aux_loss(r.logits, 3, score, padding)
    torch.testing.assert_close(losses.switch_megatron_loss(r), ref)
    torch.testing.assert_close(losses.switch_loss(r), 3 * ref)
    torch.testing.assert_close(losses.LOSSES["switch_megatron"](r), ref)


def test_switch_megatron_is_one_at_perfect_balance_and_through_moe():
    router = moegrad.Router(4, 4, 1)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4) * 50)
    r = router(torch.eye(4))
    torch.testing.assert_close(losses.switch_megatron_loss(r), torch.tensor(1.0), atol=1e-3, rtol=0)
    moe = moegrad.MoE(5, 8, 6, 2, losses={"switch": 0.5, "switch_megatron": 0.25, "z_loss": 0.1})
    out = moe(torch.randn(2, 6, 5))
    ref = _megatron_aux_loss(out.routing.logits, 2, "softmax")
    torch.testing.assert_close(out.losses["switch_megatron"], ref)
    torch.testing.assert_close(out.aux_loss, 0.5 * 2 * ref + 0.25 * ref + 0.1 * losses.z_loss(out.routing))
    # gradient of Megatron-Core's formula, through autograd of the transcription
    got = torch.autograd.grad(out.losses["switch_megatron"], moe.router.gate.weight, retain_graph=True)[0]
    want = torch.autograd.grad(ref, moe.router.gate.weight)[0]
    torch.testing.assert_close(got, want)


def test_under_a_selection_bias_losses_count_the_selected_experts_megatron_the_unbiased_topk():
    router, _ = _routing(e=6, k=2, selection_bias=True)
    with torch.no_grad():
        router.gate.weight.mul_(4)  # clear preferences, so whose counts are used matters
        router.bias.copy_(torch.tensor([2.0, 2.0, 0, 0, 0, 0]))  # experts 0 and 1 always selected
    r = router(torch.randn(12, 5))
    assert (r.indices.sort(-1).values == torch.tensor([0, 1])).all()
    selected = torch.zeros_like(r.logits).scatter(1, r.indices, 1.0).bool()
    torch.testing.assert_close(losses.switch_megatron_loss(r),
                               _megatron_aux_loss(r.logits, 2, "softmax", routing_map=selected))
    megatron = _megatron_aux_loss(r.logits, 2, "softmax")  # its counts: top-k without the bias
    unbiased, _ = _megatron_scores_for_aux_loss(r.logits, 2, "softmax")
    assert int((unbiased != selected).any(-1).sum()) >= 6  # most tokens would go elsewhere unbiased
    assert abs(float(losses.switch_megatron_loss(r).detach()) - float(megatron.detach())) > 0.02


def test_seq_aux_against_megatron_equal_without_padding_batch_mean_length_with_padding():
    torch.manual_seed(5)
    b, s, e, k = 3, 6, 6, 2
    router = moegrad.Router(5, e, k, score="sigmoid").requires_grad_(False)  # values only
    x = torch.randn(b, s, 5)
    r = router(x)
    seq_major = r.logits.view(b, s, e).transpose(0, 1).reshape(-1, e)  # Megatron's [S, B] order
    torch.testing.assert_close(losses.seq_aux_loss(r), _megatron_seq_aux_loss(seq_major, k, "sigmoid", s, b))
    # padding: lengths 6, 3 and 0 (an all-padding sequence)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3, [False] * 6])
    r = router(x, mask=mask)
    padding = (~mask).transpose(0, 1).reshape(-1)
    megatron = _megatron_seq_aux_loss(seq_major, k, "sigmoid", s, b, padding)
    lengths = mask.sum(1).double()
    mean_length = lengths.sum() / b  # 3: the batch's mean real length, over all B sequences
    own = []  # moegrad's per-sequence value with the sequence's own length
    for i in range(b):
        if lengths[i] > 0:
            one = _logits_routing_like(r, i, s)
            own.append(float(losses.seq_aux_loss(one)))
    assert abs(float(losses.seq_aux_loss(r)) - sum(own) / len(own)) < 1e-6  # mean over sequences with tokens
    rescaled = sum(o * float(lengths[i] / mean_length) ** 2 for i, o in zip(range(b), own)) / b
    assert abs(float(megatron) - rescaled) < 1e-6
    assert abs(float(megatron) - float(losses.seq_aux_loss(r))) > 0.05  # the conventions differ


def _logits_routing_like(r, i, s):
    """Sequence i of a (B, S) routing alone, its padding tokens dropped."""
    from moegrad.routing import Routing

    rows = slice(i * s, (i + 1) * s)
    keep = r.mask[rows]
    return Routing(logits=r.logits[rows][keep], scores=r.scores[rows][keep],
                   indices=r.indices[rows][keep], weights=r.weights[rows][keep],
                   shape=(int(keep.sum()),))
