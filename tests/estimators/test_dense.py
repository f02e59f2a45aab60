"""dense and default_moe against explicit evaluation of every expert."""

import pytest
import torch
import torch.nn.functional as F

import moegrad
from tests.conftest import every_expert_ref


def _pair(estimator, top_k=2, seed=3, **kw):
    torch.manual_seed(seed)
    kw.setdefault("losses", {})
    return moegrad.MoE(6, 12, 5, top_k, estimator=estimator, **kw).double()


def _grads(moe, x, g):
    moe.zero_grad()
    x = x.clone().requires_grad_(True)
    out = moe(x)
    (out.y * g).sum().backward()
    return out, x.grad, {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("chunk_tokens", [None, 1, 3])
def test_dense_router_gradient_equals_explicit_all_expert_reference(normalize, chunk_tokens):
    opts = {} if chunk_tokens is None else {"chunk_tokens": chunk_tokens}
    moe = _pair("dense", normalize=normalize, routed_scaling_factor=1.3, **opts)
    x, g = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    out, _, grads = _grads(moe, x, g)

    # reference: every expert evaluated explicitly; for unselected i, y gains
    # c * (s_i - sg(s_i)) / n * sg(E_i(x)), n = 1 or, renormalised, n = sg(sum_S s) (the
    # DenseMixer weight s_i / sg(sum_S s)); for selected the topk weights.
    gate = moe.router.gate.weight.detach().clone().requires_grad_(True)
    s = torch.softmax(x @ gate.T, -1)
    every = every_expert_ref(x, moe).detach()  # [T, E, D]
    idx = out.routing.indices
    w = s.gather(1, idx)
    n = w.sum(-1, keepdim=True).detach() if normalize else 1.0
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    y = 1.3 * (w[..., None] * every.gather(1, idx[..., None].expand(-1, -1, 6))).sum(1)
    unselected = torch.ones_like(s).scatter(1, idx, 0.0)
    y = y + 1.3 * (((s - s.detach()) / n * unselected)[..., None] * every).sum(1)
    torch.testing.assert_close(out.y, y)
    (y * g).sum().backward()
    torch.testing.assert_close(grads["router.gate.weight"], gate.grad, rtol=1e-10, atol=1e-12)


def test_dense_sends_no_gradient_to_experts_or_input_through_unselected_experts():
    dense, topk = _pair("dense"), _pair("topk")
    x, g = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    out_d, xg_d, grads_d = _grads(dense, x, g)
    out_t, xg_t, grads_t = _grads(topk, x, g)
    torch.testing.assert_close(out_d.y, out_t.y)
    for name in ("experts.w1", "experts.w2", "experts.w3"):
        torch.testing.assert_close(grads_d[name], grads_t[name])
    # the input differs only through the router gate (dense has the larger router gradient)
    gate_diff = grads_d["router.gate.weight"] - grads_t["router.gate.weight"]
    assert gate_diff.abs().max() > 1e-6


def test_dense_k1_equals_topk_kE_under_a_linear_loss():
    """With k=1 dense, dL/ds_i = <g, E_i(x)> for every i: what topk with k=E gives exactly."""
    dense, full = _pair("dense", top_k=1), _pair("topk", top_k=5)
    x, g = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    _, _, gd = _grads(dense, x, g)
    _, _, gf = _grads(full, x, g)
    torch.testing.assert_close(gd["router.gate.weight"], gf["router.gate.weight"])


def test_dense_in_eval_or_no_grad_costs_nothing_extra(monkeypatch):
    moe = _pair("dense")
    calls = []
    evaluate = moe.experts.unselected_inner_products
    monkeypatch.setattr(moe.experts, "unselected_inner_products", lambda *a: calls.append(1) or evaluate(*a))
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        y = moe(x).y
    torch.testing.assert_close(y, _pair("topk")(x).y)
    moe(x).y.sum().backward()  # with grad: the unselected experts are evaluated in backward
    assert len(calls) == 1


def test_default_moe_ema_update_matches_hand_computation():
    moe = _pair("default_moe", beta=0.8)
    est = moe.router.estimator
    x1, x2 = torch.randn(12, 6, dtype=torch.float64), torch.randn(12, 6, dtype=torch.float64)

    def means(x):
        with torch.no_grad():
            r = moe.router(x)
            every = every_expert_ref(x, moe)
            out = {}
            for e in range(5):
                rows = [every[t, e] for t in range(x.shape[0]) if e in r.indices[t].tolist()]
                if rows:
                    out[e] = torch.stack(rows).mean(0)
            return out

    m1, m2 = means(x1), means(x2)
    moe.train()
    moe(x1)
    for e, v in m1.items():
        torch.testing.assert_close(est.defaults[e].double(), v, rtol=1e-5, atol=1e-6)
    moe(x2)
    for e in m2:
        expected = 0.8 * m1[e] + 0.2 * m2[e] if e in m1 else m2[e]
        torch.testing.assert_close(est.defaults[e].double(), expected, rtol=1e-5, atol=1e-6)
    unseen = [e for e in range(5) if e not in m1 and e not in m2]
    for e in unseen:
        assert torch.count_nonzero(est.defaults[e]) == 0
    before = est.defaults.clone()
    moe.eval()
    moe(x1)
    assert torch.equal(before, est.defaults)
    assert not est.defaults.requires_grad


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("forward_defaults", [False, True])
def test_default_moe_router_gradient_uses_default_outputs(forward_defaults, normalize):
    moe = _pair("default_moe", forward_defaults=forward_defaults, routed_scaling_factor=2.0,
                normalize=normalize)
    ebar = torch.randn(5, 6)
    moe.router.estimator.defaults.copy_(ebar)
    moe.eval()  # keep the defaults fixed
    x, g = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)
    out, _, grads = _grads(moe, x, g)
    topk = _pair("topk", routed_scaling_factor=2.0, normalize=normalize)
    out_t, _, _ = _grads(topk, x, g)

    # y = topk's sparse output + 2 * sum_{i not in S} s_i / n * ebar_i (straight-through unless
    # forward_defaults), n = 1 or sg(sum_S s): the renormalised forward's weight, as dense's
    gate = moe.router.gate.weight.detach().clone().requires_grad_(True)
    s = torch.softmax(x @ gate.T, -1)
    idx = out.routing.indices
    unselected = torch.ones_like(s).scatter(1, idx, 0.0)
    s_sel = s.gather(1, idx)
    n = s_sel.sum(-1, keepdim=True).detach() if normalize else 1.0
    extra = 2.0 * (s / n * unselected) @ ebar.double()
    e_sel = every_expert_ref(x, moe).detach().gather(1, idx[..., None].expand(-1, -1, 6))  # [T, K, D]
    w = s_sel / s_sel.sum(-1, keepdim=True) if normalize else s_sel
    y = out_t.y.detach() + 2.0 * ((w - w.detach())[..., None] * e_sel).sum(1)
    y = y + (extra if forward_defaults else extra - extra.detach())
    torch.testing.assert_close(out.y, y)
    (y * g).sum().backward()
    torch.testing.assert_close(grads["router.gate.weight"], gate.grad, rtol=1e-10, atol=1e-12)
    if not forward_defaults:
        torch.testing.assert_close(out.y, out_t.y)


@pytest.mark.parametrize("estimator", ["dense", "straight_through", "default_moe", "sparsemixer"])
def test_top1_normalized_router_learns_with_the_fixes(estimator):
    # sparsemixer's gradient lives on the experts its mask keeps: at this small random init the
    # logits differ by more than 2 * 0.01 relative, so widen the mask to keep several experts.
    opts = {"jitter_eps": 0.5} if estimator == "sparsemixer" else {}
    moe = _pair(estimator, top_k=1, normalize=True, **opts)
    moe.train()
    x, g = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64)
    if estimator == "default_moe":
        moe(x)  # one training step fills the default outputs
    _, _, grads = _grads(moe, x, g)
    assert grads["router.gate.weight"].norm() > 1e-3


def test_every_expert_adapter_matches_the_reference():
    """The path for expert modules without unselected_inner_products (e.g. GPT-OSS in HF)."""
    from moegrad.estimators.dense import inner_products_from_every_expert

    moe = _pair("dense")
    x, g = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    indices = torch.rand(9, 5).topk(2, -1).indices
    inner = inner_products_from_every_expert(moe.experts.every_expert)
    got = inner(x, g, indices, moe.experts.stacked_weights())
    want = torch.einsum("ted,td->te", every_expert_ref(x, moe), g).scatter(1, indices, 0.0)
    torch.testing.assert_close(got, want.detach())


# --------------------------------------------------------------------------------------------
# DenseMixer's renormalised top-k on a patched Hugging Face Qwen3-MoE


def _tiny_qwen3(norm_topk_prob):
    """A tiny random Qwen3-MoE in fp64 (2 layers, 6 experts, top-2), routers sharpened."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, intermediate_size=40,
        moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).double().train()
    for m in model.modules():
        if type(m).__name__ == "Qwen3MoeTopKRouter":
            m.weight.data.normal_(0, 0.5)  # HF's init is near uniform; make the picks clear
    return model


def _densemixer_block_forward(block, hidden):
    """A transcription of DenseMixer's Qwen3-MoE block (github.com/yaof20/DenseMixer,
    densemixer/models/qwen3_moe_custom.py, forward + GateGradSTE), every expert evaluated:

        s = softmax(z) in fp32, S = top-k(s), r = sum_S s
        routing weight of expert e: s_e / r (e in S), s_e / sg(r) (e not in S); s if not renormalised
        forward  y = sum_S sg(w_e) E_e(x)          (expert weights and x learn from S only)
        backward dL/dw_e = <g, E_e(x)> for every e  (straight-through: sum_e w_e sg(E_e(x)))
    """
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1])
    z = F.linear(x, block.gate.weight)
    s = torch.softmax(z, dim=-1, dtype=torch.float32)
    top, idx = torch.topk(s, block.gate.top_k, dim=-1)
    mask = torch.zeros_like(s).scatter(1, idx, 1.0)
    w = s
    if block.gate.norm_topk_prob:
        r = top.sum(-1, keepdim=True)
        w = s * (1.0 - mask) / r.detach() + s * mask / r
    w = w.to(x.dtype)  # [T, E]
    gate_up = torch.einsum("td,ehd->teh", x, block.experts.gate_up_proj)
    g, u = gate_up.chunk(2, dim=-1)
    every = torch.einsum("teh,edh->ted", F.silu(g) * u, block.experts.down_proj)  # [T, E, D]
    sparse = (w.detach()[..., None] * mask.to(x.dtype)[..., None] * every).sum(1)
    dense = (w[..., None] * every.detach()).sum(1)
    return (sparse + (dense - dense.detach())).reshape(shape)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_patched_qwen3_moe_dense_equals_densemixer(norm_topk_prob):
    """moegrad.hf.patch(estimator="dense") on a tiny Qwen3-MoE: loss and the gradient of every
    parameter (routers, experts, attention, embeddings, norms) equal those of the model whose
    MoE blocks run the DenseMixer transcription above, to 1e-10 relative (fp64)."""
    import copy
    import types

    import moegrad.hf as mh

    base = _tiny_qwen3(norm_topk_prob)
    patched = mh.patch(copy.deepcopy(base), estimator="dense")
    reference = copy.deepcopy(base)
    blocks = [m for m in reference.modules() if type(m).__name__ == "Qwen3MoeSparseMoeBlock"]
    assert len(blocks) == 2
    for block in blocks:
        block.forward = types.MethodType(_densemixer_block_forward, block)
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    loss_p = patched(ids, labels=ids).loss
    loss_r = reference(ids, labels=ids).loss
    loss_p.backward()
    loss_r.backward()
    torch.testing.assert_close(loss_p, loss_r, rtol=1e-12, atol=0)
    got = dict(patched.named_parameters())
    checked = 0
    for name, p in reference.named_parameters():
        if p.grad is None:
            continue
        rel = float((got[name].grad - p.grad).norm() / p.grad.norm())
        assert rel <= 1e-10, (name, rel)
        checked += 1
    assert checked == len(list(reference.parameters()))
    router = reference.model.layers[1].mlp.gate.weight.grad
    assert float(router.norm()) > 1e-5  # the routers do get a gradient


# --------------------------------------------------------------------------------------------
# default_moe: a non-finite token never enters the default outputs


def _twins(dtype, **kw):
    """(default_moe, topk) with the same weights, in training mode."""
    torch.manual_seed(5)
    a = moegrad.MoE(6, 12, 5, 2, estimator="default_moe", losses={}, **kw).to(dtype).train()
    torch.manual_seed(5)
    b = moegrad.MoE(6, 12, 5, 2, estimator="topk", losses={}, **kw).to(dtype).train()
    return a, b


def _hit_by(indices, token, num_experts=5):
    return torch.zeros(num_experts, dtype=torch.int64).index_fill_(0, indices[token], 1)


@pytest.mark.parametrize("case", ["nan_token", "fp16_overflow"])
def test_default_moe_skips_non_finite_observations(case):
    """One NaN token (check_finite=False) or one fp16 token whose expert outputs overflow: the
    experts it reached skip this observation (counted in ``skipped`` and ``stats``), and every
    other token's output is topk's, in this batch, in later batches, in train and in eval."""
    dtype = torch.float16 if case == "fp16_overflow" else torch.float32
    # the finite check cannot catch the fp16 case: x is finite, only the expert outputs are not
    moe, topk = _twins(dtype, **({"check_finite": False} if case == "nan_token" else {}))
    est = moe.router.estimator
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10, 6, generator=gen).to(dtype)
    if case == "nan_token":
        x[3, 2] = float("nan")
    else:
        x[3] = x[3] / x[3].abs().max() * 60000.0  # finite in fp16; its expert outputs overflow
    out, ref = moe(x), topk(x)
    assert not torch.isfinite(out.y[3]).all() and not torch.isfinite(ref.y[3]).all()
    others = torch.arange(10) != 3
    assert torch.isfinite(out.y[others]).all()
    assert torch.equal(out.y[others], ref.y[others])
    assert torch.isfinite(est.defaults).all()
    hit_by_bad = _hit_by(out.routing.indices, 3)
    assert torch.equal(est.skipped, hit_by_bad)
    assert torch.equal(out.stats.skipped_observations, hit_by_bad)
    assert torch.equal(est.seen, out.stats.tokens_per_expert.bool() & ~hit_by_bad.bool())

    x2 = torch.randn(12, 6, generator=gen).to(dtype)  # later batches, train then eval
    for train in (True, False):
        moe.train(train)
        topk.train(train)
        x2g = x2.clone().requires_grad_()
        out2, ref2 = moe(x2g), topk(x2)
        assert torch.equal(out2.y, ref2.y) and torch.isfinite(out2.y).all()
        out2.y.float().square().sum().backward()
        assert torch.isfinite(moe.router.gate.weight.grad).all()
        assert torch.isfinite(x2g.grad).all()
        moe.zero_grad()
    assert bool(est.seen.all())  # the second batch filled what the first skipped
    assert torch.equal(est.skipped, hit_by_bad)  # finite batches skip nothing
    assert "skipped" not in moe.state_dict()  # old checkpoints keep loading


def test_default_moe_observe_counts_each_skipped_expert():
    """observe() directly: a non-finite mean, or a finite mean whose fp16 default overflows,
    leaves that expert's default unchanged; the other experts are updated as before."""
    moe = _pair("default_moe", beta=0.5).float()
    est = moe.router.estimator
    est.defaults.fill_(1.0)
    est.seen.fill_(True)
    sums = torch.ones(5, 6)
    sums[1, 0] = float("inf")
    sums[2, 3] = float("nan")
    counts = torch.tensor([2, 1, 3, 0, 4])
    est.observe(sums, counts)
    expected = torch.ones(5, 6)
    expected[0] = 0.5 + 0.5 * 0.5
    expected[4] = 0.5 + 0.5 * 0.25
    assert torch.equal(est.defaults, expected)
    assert est.skipped.tolist() == [0, 1, 1, 0, 0]
    est.half()
    est.observe(torch.full((5, 6), 1e6), torch.ones(5, dtype=torch.int64))  # 5e5 > fp16 max
    assert torch.isfinite(est.defaults).all()
    assert est.skipped.tolist() == [1, 2, 2, 1, 1]


def test_dense_router_grad_takes_a_plain_tuple_of_weights():
    """An experts module whose weights are a plain tuple (no named fields) gets the same
    router gradient as with the named tuple."""
    from moegrad.estimators.dense import dense_router_grad, inner_products_from_every_expert

    torch.manual_seed(0)
    experts = moegrad.Experts(4, 6, 5)
    x, indices = torch.randn(3, 4), torch.tensor([[0, 1], [2, 3], [4, 0]])
    named = experts.stacked_weights()
    plain = (named.gate, named.up, named.down)

    def every(x, weights):
        return experts.every_expert(x, type(named)._make(weights))

    grads = []
    for weights in (named, plain):
        scores = torch.rand(3, 5, requires_grad=True)
        y = dense_router_grad(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), scores, x,
                              indices, inner_products_from_every_expert(every), weights)
        y.sum().backward()
        grads.append(scores.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])
