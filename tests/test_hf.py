"""moegrad.hf: patching transformers MoE models (tiny random configs, no network).

Shapes: B batch, S sequence, T tokens, D hidden, E experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import moegrad  # noqa: E402
import moegrad.hf as mh  # noqa: E402
from moegrad.losses import switch_loss  # noqa: E402

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared CPU (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
              bos_token_id=1)


def tiny(family: str, **over):
    """A tiny random-init causal LM of ``family`` in fp32, eval mode."""
    t = transformers
    if family == "mixtral":
        cfg = t.MixtralConfig(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                              **COMMON)
        cls = t.MixtralForCausalLM
    elif family == "qwen2_moe":
        cfg = t.Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=24,
                               shared_expert_intermediate_size=16, num_experts=6,
                               num_experts_per_tok=2, norm_topk_prob=False, **COMMON)
        cls = t.Qwen2MoeForCausalLM
    elif family == "qwen3_moe":
        cfg = t.Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=24, num_experts=6,
                               num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, **COMMON)
        cls = t.Qwen3MoeForCausalLM
    elif family == "olmoe":
        cfg = t.OlmoeConfig(intermediate_size=24, num_experts=6, num_experts_per_tok=2, **COMMON)
        cls = t.OlmoeForCausalLM
    elif family == "deepseek_v3":
        cfg = t.DeepseekV3Config(intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
                                 num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                                 first_k_dense_replace=1, routed_scaling_factor=2.5,
                                 norm_topk_prob=True, kv_lora_rank=8, q_lora_rank=12,
                                 qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, **COMMON)
        cls = t.DeepseekV3ForCausalLM
    elif family == "gpt_oss":
        cfg = t.GptOssConfig(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                             head_dim=8, layer_types=["sliding_attention", "full_attention"],
                             sliding_window=4, **COMMON)
        cls = t.GptOssForCausalLM
    elif family == "phimoe":  # tiny jitter_eps: only the argmax survives the mask (deterministic)
        cfg = t.PhimoeConfig(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                             router_jitter_noise=1e-9, **COMMON)
        cls = t.PhimoeForCausalLM
    else:  # pragma: no cover
        raise KeyError(family)
    for key, value in over.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = cls(cfg).float().eval()
    if family == "deepseek_v3":  # a non-zero correction bias so the test exercises it
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.05)
    if family == "gpt_oss":  # non-zero expert biases so the test exercises them
        for m in model.modules():
            if hasattr(m, "gate_up_proj_bias"):
                m.gate_up_proj_bias.data.normal_(0, 0.1)
                m.down_proj_bias.data.normal_(0, 0.1)
    # the HF init (std 0.02) makes routers near uniform: sharpen them so selections are clear
    for m in model.modules():
        if type(m).__name__.endswith(("TopKRouter", "TopkRouter")):  # PhimoeTopKRouter too
            m.weight.data.normal_(0, 0.5)
    return model


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "phimoe", "gpt_oss"]
#: the estimator that keeps each family's own routing
SAME = {f: "sparsemixer" if f == "phimoe" else "topk" for f in FAMILIES}
#: an estimator with another router gradient that keeps each family's forward
OTHER = {f: "sparsemixer" if f == "phimoe" else "dense" for f in FAMILIES}
#: families whose weights are renormalised with K=1 (switch or always): top-1 gives w = c
TOP1 = [f for f in FAMILIES if f != "phimoe"]
NO_TOP1 = "PhiMoE's SparseMixer always makes two picks (no top-1 configuration)"


def test_families_cover_moegrad_hf():
    assert sorted(FAMILIES) == sorted(mh.FAMILIES)


def tiny_top1(family: str):
    """``tiny(family)`` with K=1 and renormalised weights (norm_topk_prob where the family
    has the switch; Mixtral and GPT-OSS always renormalise)."""
    over = {"num_experts_per_tok": 1}
    if family in ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"):
        over["norm_topk_prob"] = True
    model = tiny(family, **over)
    assert all(m.top_k == 1 for m in model.modules() if type(m).__name__.endswith("Router"))
    return model


def maxabs(t) -> float:
    return float(t.detach().abs().max())


def router_weight_grads(model, family):
    """The HF router weight gradients [E, D] of every MoE block, stacked (zeros if None)."""
    attr = mh.FAMILIES[family].gate
    cls = mh.FAMILIES[family].block_class()
    gates = [getattr(m, attr).weight for m in model.modules() if isinstance(m, cls)]
    assert gates
    return torch.stack([w.grad if w.grad is not None else torch.zeros_like(w) for w in gates])


def ids(seed=1, batch=2, seq=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 64, (batch, seq), generator=g)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def moe_blocks(model):
    return [m for m in model.modules() if hasattr(m, "moegrad_router")]


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_logits_grads_and_keys_match_unpatched(family):
    model = tiny(family).train()
    x = ids()
    ref = model(x, labels=x)
    ref.loss.backward()
    g_ref = grads(model)
    model.zero_grad()
    keys = {k: v.shape for k, v in model.state_dict().items()}

    mh.patch(model, SAME[family])
    assert len(moe_blocks(model)) >= 1
    # the grouped_mlp path (GPT-OSS has its own expert function, computed per expert)
    assert mh.routers(model)[0].hf_experts.silu == (family != "gpt_oss")
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    out = model(x, labels=x)
    out.loss.backward()
    g = grads(model)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=0)
    assert set(g) == set(g_ref)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)
    router_grads = [g[n] for n in g if n.endswith(("mlp.gate.weight", "mlp.router.weight"))]
    assert router_grads
    if family != "phimoe":  # tiny jitter_eps leaves one candidate: p_D = 1, no router gradient
        assert all(float(r.abs().sum()) > 0 for r in router_grads)


@pytest.mark.parametrize("family", [
    pytest.param(f, marks=pytest.mark.skip(reason="transformers' DeepSeek-V3 has no router aux "
                                           "loss (it balances with e_score_correction_bias)"))
    if f == "deepseek_v3" else f for f in FAMILIES])
def test_hf_aux_loss_unchanged(family):
    """output_router_logits=True: HF's aux loss, the total loss and every gradient (the aux
    loss reaches the router through the gate module the patched block still calls) match."""
    model = tiny(family, router_aux_loss_coef=0.3).train()
    x = ids(2)
    ref = model(x, labels=x, output_router_logits=True)
    ref.loss.backward()
    g_ref = grads(model)
    model.zero_grad()
    assert ref.aux_loss is not None and float(ref.aux_loss.detach()) > 0
    mh.patch(model, SAME[family])
    out = model(x, labels=x, output_router_logits=True)
    out.loss.backward()
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert len(out.router_logits) == model.config.num_hidden_layers
    for name, value in grads(model).items():
        torch.testing.assert_close(value, g_ref[name], atol=1e-5, rtol=1e-4, msg=name)
    if OTHER[family] != SAME[family]:  # another router gradient: the same HF aux loss
        mh.unpatch(model)
        mh.patch(model, OTHER[family])
        out = model(x, labels=x, output_router_logits=True)
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


def test_mixtral_jitter_in_training_matches():
    model = tiny("mixtral", router_jitter_noise=0.1).train()
    for m in model.modules():
        if hasattr(m, "jitter_noise"):
            m.jitter_noise = 0.1
    x = ids(3)
    torch.manual_seed(5)
    ref = model(x).logits
    mh.patch(model)
    torch.manual_seed(5)
    out = model(x).logits
    torch.manual_seed(6)
    other = model(x).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert float((other - ref).abs().max().detach()) > 1e-4  # the jitter is really applied


@pytest.mark.parametrize("family", TOP1 + [pytest.param("phimoe", marks=pytest.mark.skip(
    reason=NO_TOP1))])
def test_top1_renormalised_router_learns_only_with_dense_estimators(family):
    """K=1 with renormalised weights: the combine weight is the constant c, so HF's own model
    and topk give the router 0 task gradient; dense estimators give it one, same logits."""
    x = ids(4)

    def run(name):
        model = tiny_top1(family).train()
        if name is not None:
            mh.patch(model, name)
        if name == "default_moe":  # one step to fill the default outputs
            model(x)
        model.zero_grad()
        out = model(x, labels=x)
        out.loss.backward()
        return out.logits.detach(), router_weight_grads(model, family)

    logits_hf, g_hf = run(None)
    logits_topk, g_topk = run("topk")
    # d(s/s)/ds is 0 up to rounding (DeepSeek-V3: s/(s + 1e-20), as small)
    assert maxabs(g_hf) < 1e-9 and maxabs(g_topk) < 1e-9
    torch.testing.assert_close(logits_topk, logits_hf, atol=1e-5, rtol=0)
    for estimator in ("dense", "default_moe", "straight_through"):
        logits_est, g_est = run(estimator)
        assert maxabs(g_est) > 1e-4, estimator
        # every patched block's router learns, not only the last one
        assert all(maxabs(g) > 1e-6 for g in g_est), estimator
        torch.testing.assert_close(logits_est, logits_hf, atol=1e-5, rtol=0, msg=estimator)


@pytest.mark.parametrize("family", TOP1 + [pytest.param("phimoe", marks=pytest.mark.skip(
    reason="dense changes PhiMoE's SparseMixer forward; HF's weights are no topk reference"))])
def test_dense_router_gradient_matches_independent_reference(family):
    """One block: dense's router gradient equals autograd of HF's own sparse output plus
    sum_{i not in S} c (s_i - sg(s_i)) / n E_i(x), with E_i(x) from HF's experts module and
    n = sg(sum_S s) where the family renormalises the top-k weights (DenseMixer's rule), else 1."""
    model = tiny(family).train()
    block = next(m for m in model.modules() if isinstance(m, mh.FAMILIES[family].block_class()))
    gate = getattr(block, mh.FAMILIES[family].gate)
    x = torch.randn(2, 5, 32)
    g = torch.randn(2, 5, 32)
    mh.patch(model, "dense")
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    (out * g).sum().backward()  # shared experts (Qwen2-MoE, DeepSeek-V3) do not reach the gate
    got = gate.weight.grad.clone()
    gate.weight.grad = None
    mh.unpatch(model)

    flat = x.reshape(-1, 32)
    z, w, idx = gate(flat)  # HF's own selection and differentiable top-k weights
    z = z.float()
    s = torch.sigmoid(z) if family == "deepseek_v3" else torch.softmax(z, -1)
    c = 2.5 if family == "deepseek_v3" else 1.0
    num_experts = s.shape[1]
    renormalised = family in ("mixtral", "gpt_oss") or getattr(gate, "norm_topk_prob", False)
    n = s.gather(1, idx).sum(-1, keepdim=True).detach() if renormalised else 1.0
    y = block.experts(flat, idx, w)
    for e in range(num_experts):
        with torch.no_grad():
            ones = torch.ones(flat.shape[0], 1)
            e_out = block.experts(flat, torch.full((flat.shape[0], 1), e), ones)  # [T, D]
        unselected = (idx != e).all(-1, keepdim=True).float()
        y = y + unselected * c * (s[:, e:e + 1] - s[:, e:e + 1].detach()) / n * e_out
    (y.view_as(x) * g).sum().backward()
    assert float(got.abs().sum()) > 0
    torch.testing.assert_close(got, gate.weight.grad, atol=1e-6, rtol=1e-4)


#: estimator variants whose eval-mode forward the policy judges
VARIANTS = [("topk", {}), ("dense", {}), ("default_moe", {}),
            ("default_moe", {"forward_defaults": True}), ("unweighted", {}),
            ("straight_through", {}), ("gumbel", {}), ("gumbel", {"tau": 0.5}),
            ("gumbel", {"hard": True}), ("noisy_topk", {}), ("sparsemixer", {}),
            ("sparsemixer", {"jitter_eps": 0.5})]


@pytest.mark.parametrize("top1", [False, True], ids=["k2", "top1"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_policy_matches_the_logits(family, top1):
    """patch refuses an estimator exactly when it changes the eval logits: every refused
    variant, patched with allow_forward_change=True, moves them by > 1e-4, every accepted one
    by < 1e-5 (after a training forward, so default_moe's defaults are filled)."""
    if top1 and family == "phimoe":
        pytest.skip(NO_TOP1)
    model = tiny_top1(family) if top1 else tiny(family)
    if family == "phimoe":  # a real SparseMixer mask: several candidates per pick
        for m in model.modules():
            if hasattr(m, "router_jitter_noise"):
                m.router_jitter_noise = 0.2
    x = ids(5)
    with torch.no_grad():
        ref = model(x).logits
    outcome = {}
    for name, opts in VARIANTS:
        label = name + "".join(f",{k}={v}" for k, v in opts.items())
        if family == "deepseek_v3" and moegrad.estimators.get(name).samples:
            with pytest.raises(ValueError, match=f"estimator='{name}' samples"):
                mh.patch(model, name, allow_forward_change=True, **opts)
            continue
        try:
            mh.patch(model, name, **opts)
        except ValueError as e:
            assert f"estimator='{name}' would change the forward of {family}" in str(e)
            assert "allow_forward_change=True" in str(e)
            refused = True
        else:
            refused = False
            mh.unpatch(model)
        mh.patch(model, name, allow_forward_change=True, **opts)
        with torch.no_grad():
            model.train()
            model(x)
            model.eval()
            diff = maxabs(model(x).logits - ref)
        mh.unpatch(model)
        outcome[label] = (refused, diff)
    # sparsemixer at jitter 0.01 with K=1 renormalised equals the family where its mask leaves
    # one candidate, which on these logits is every token: refused (it differs in general) but
    # not measurable here
    if top1:
        outcome.pop("sparsemixer", None)
    wrong = {k: v for k, v in outcome.items() if (v[1] > 1e-4) != v[0] or (not v[0] and v[1] > 1e-5)}
    assert not wrong, wrong
    kept = sorted(k for k, (refused, _) in outcome.items() if not refused)
    expect_kept = {  # the docstring's table
        "phimoe": ["sparsemixer"],
        "deepseek_v3": ["default_moe", "dense", "topk"] + (["straight_through"] if top1 else []),
    }.get(family, ["default_moe", "dense", "gumbel", "topk"]
          + (["noisy_topk"] if family in ("mixtral", "qwen3_moe", "gpt_oss") or top1 else [])
          + (["gumbel,hard=True", "gumbel,tau=0.5", "straight_through", "unweighted"]
             if top1 else []))
    assert kept == sorted(expect_kept)


def test_forward_change_refused_with_reason_and_opt_in():
    model = tiny("qwen3_moe")
    x = ids(5)
    ref = model(x).logits.detach()
    with pytest.raises(ValueError, match=r"estimator='unweighted' would change the forward of "
                       r"qwen3_moe in Qwen3MoeForCausalLM: it mixes the selected experts with "
                       r"unit weights.*keep it: \['default_moe', 'dense', 'gumbel', 'noisy_topk', "
                       r"'topk'\]\. Pass allow_forward_change=True"):
        mh.patch(model, "unweighted")
    with pytest.raises(ValueError, match=r"estimator='gumbel'.*tau=0.5, not softmax\(z\)"):
        mh.patch(model, "gumbel", tau=0.5)
    with pytest.raises(ValueError, match=r"estimator='default_moe'.*forward_defaults=True"):
        mh.patch(model, "default_moe", forward_defaults=True)
    olmoe = tiny("olmoe")  # norm_topk_prob=False: noisy_topk's softmax over the kept logits
    with pytest.raises(ValueError, match=r"estimator='noisy_topk'.*olmoe.*not renormalised"):
        mh.patch(olmoe, "noisy_topk")
    phimoe = tiny("phimoe")
    with pytest.raises(ValueError, match=r"estimator='sparsemixer'.*jitter_eps.*router_jitter_noise"):
        mh.patch(phimoe, "sparsemixer", jitter_eps=0.3)
    assert not moe_blocks(model) and not moe_blocks(olmoe) and not moe_blocks(phimoe)
    with pytest.raises(TypeError, match="allow_forward_change must be True or False"):
        mh.patch(model, "unweighted", allow_forward_change="yes")
    mh.patch(model, "unweighted", allow_forward_change=True)
    assert maxabs(model(x).logits - ref) > 1e-3  # unit weights: a different model
    model.train()
    out = model(x, labels=x)
    out.loss.backward()  # unweighted: no router task gradient, as documented
    assert all(p.grad is None or maxabs(p.grad) == 0
               for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))


def test_sampling_estimators_keep_the_eval_forward_and_sample_in_training():
    """The decision for sampling estimators: accepted where their eval forward is the family's,
    while their training forward samples (differs from the clean top-k, varies with the seed)."""
    model = tiny("mixtral").train()
    x = ids(6)
    with torch.no_grad():
        ref = model(x).logits
        for name in ("gumbel", "noisy_topk"):
            mh.patch(model, name)  # accepted without allow_forward_change
            if name == "noisy_topk":  # the paper's zero init gives sigma = noise_epsilon only
                for r in mh.routers(model):
                    r.estimator.w_noise.fill_(0.5)
            torch.manual_seed(1)
            a = model(x).logits
            torch.manual_seed(2)
            b = model(x).logits
            assert maxabs(a - ref) > 1e-4 and maxabs(a - b) > 1e-4, name
            model.eval()
            torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=0, msg=name)
            model.train()
            mh.unpatch(model)


def test_other_estimators_keep_forward_in_eval():
    model = tiny("qwen3_moe")
    x = ids(5)
    ref = model(x).logits
    for name, opts in [("gumbel", {"tau": 1.0}), ("default_moe", {}), ("dense", {})]:
        mh.patch(model, name, **opts)
        torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=0, msg=name)
        mh.unpatch(model)


@pytest.mark.parametrize("impl", [i for i in mh.IMPLS if i not in (None, "auto")])
def test_every_impl_matches(impl):
    model = tiny("olmoe").train()
    if impl == "hf":  # also GPT-OSS through transformers' own experts
        oss = tiny("gpt_oss")
        ref = oss(ids(6)).logits
        mh.patch(oss, impl="hf")
        torch.testing.assert_close(oss(ids(6)).logits, ref, atol=1e-5, rtol=0)
    x = ids(6)
    ref = model(x, labels=x)
    ref.loss.backward()
    g_ref = grads(model)
    model.zero_grad()
    if impl == "grouped_mm":
        from moegrad.experts import grouped_mm_applicable

        gu = model.model.layers[0].mlp.experts.gate_up_proj
        if grouped_mm_applicable(torch.zeros(4, 32), gu[:, :24], gu[:, 24:]) is not None:
            pytest.skip("grouped_mm cannot run fp32 here")
    mh.patch(model, impl=impl)
    out = model(x, labels=x)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    for name, value in grads(model).items():
        torch.testing.assert_close(value, g_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_moegrad_losses_per_block():
    model = tiny("mixtral").train()
    x = ids(7)
    mh.patch(model, losses={"switch": 0.5, "z_loss": 0.1})
    out = model(x, output_router_logits=True)
    total = mh.aux_loss(model)
    expect = 0.0
    for z in out.router_logits:  # independent: per layer E * sum_i f_i P_i and mean lse^2
        p = torch.softmax(z.float(), -1)
        picked = torch.zeros_like(p).scatter(1, p.topk(2, -1).indices, 1.0)
        switch = z.shape[1] * (picked.mean(0) * p.mean(0)).sum()
        expect = expect + 0.5 * switch + 0.1 * torch.logsumexp(z.float(), -1).square().mean()
    torch.testing.assert_close(total, expect, atol=1e-5, rtol=1e-5)
    total.backward()
    assert float(model.model.layers[0].mlp.gate.weight.grad.abs().sum()) > 0
    assert mh.aux_loss(model).item() == 0.0  # cleared after reading
    r = mh.routers(model)[0]
    assert r.last_routing.indices.shape == (x.numel(), 2)
    torch.testing.assert_close(switch_loss(r.last_routing), torch.tensor(
        6 * (torch.zeros(x.numel(), 6).scatter(1, r.last_routing.indices, 1.0).mean(0)
             * r.last_routing.scores.mean(0)).sum().item()))


def test_deepseek_correction_bias_with_bias_balancer():
    model = tiny("deepseek_v3").train()
    mh.patch(model)
    balancer = moegrad.BiasBalancer(model, gamma=0.01)
    router = mh.routers(model)[0]
    block = model.model.layers[1].mlp
    assert router.bias is block.gate.e_score_correction_bias
    before = block.gate.e_score_correction_bias.clone()
    x = ids(8)
    model(x)
    load = torch.bincount(router.last_routing.indices.reshape(-1), minlength=8).float()
    loads = balancer.step()
    torch.testing.assert_close(loads[0], load)
    torch.testing.assert_close(block.gate.e_score_correction_bias,
                               before + 0.01 * torch.sign(load.mean() - load))
    assert int(router.load_counts.sum()) == 0
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()
    # the updated bias changes the HF selection identically in the patched forward
    model.eval()
    patched = model(x).logits
    mh.unpatch(model)
    torch.testing.assert_close(model(x).logits, patched, atol=1e-5, rtol=0)


def test_router_bias_setter_writes_into_the_hf_buffer():
    """router.bias = value copies into HF's e_score_correction_bias (an nn.Buffer), also when
    the value is itself an nn.Buffer: no new buffer, state_dict keys unchanged."""
    model = tiny("deepseek_v3")
    keys = set(model.state_dict())
    mh.patch(model)
    router = mh.routers(model)[0]
    hf_bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    router.bias = torch.nn.Buffer(torch.full((8,), 0.25))
    assert router.bias is hf_bias and torch.equal(hf_bias, torch.full((8,), 0.25))
    router.bias = router.bias
    router.bias = torch.arange(8.0)
    assert router.bias is hf_bias and torch.equal(hf_bias, torch.arange(8.0))
    assert "bias" not in router._buffers and set(model.state_dict()) == keys
    with pytest.raises(ValueError, match="no selection bias"):
        mh.patch(tiny("qwen3_moe")).model.layers[0].mlp.moegrad_router.bias = torch.zeros(6)


def test_deepseek_selection_matches_group_limited_reference():
    model = tiny("deepseek_v3")
    mh.patch(model)
    x = ids(9)
    model(x)
    block = model.model.layers[1].mlp
    hf_logits, hf_w, hf_idx = block.gate(torch.randn(3, 32))  # warm call, shapes only
    assert hf_idx.shape == (3, 2)
    r = mh.routers(model)[0]
    z = r.last_routing.logits
    s = torch.sigmoid(z)
    choice = s + block.gate.e_score_correction_bias
    best = choice.view(-1, 4, 2).topk(2, -1).values.sum(-1)
    keep = torch.zeros_like(best).scatter(1, best.topk(2, -1).indices, 1.0).bool()
    choice = choice.view(-1, 4, 2).masked_fill(~keep[..., None], float("-inf")).view(-1, 8)
    idx = choice.topk(2, -1).indices
    assert torch.equal(r.last_routing.indices.sort(-1).values, idx.sort(-1).values)
    w = s.gather(1, idx)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * 2.5
    torch.testing.assert_close(r.last_routing.weights.sort(-1).values, w.sort(-1).values)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(family, tmp_path):
    """A patched model saves the HF keys only and reloads to the same logits; estimator state
    (default_moe's EMA) is non-persistent and starts from zero after the reload."""
    estimator = "sparsemixer" if family == "phimoe" else "default_moe"
    model = tiny(family).train()
    keys = set(model.state_dict())
    mh.patch(model, estimator)
    x = ids(10)
    model(x)  # default_moe fills its (non-persistent) defaults
    model.eval()
    patched = model(x).logits.detach()
    model.save_pretrained(tmp_path)
    fresh = type(model).from_pretrained(tmp_path).float().eval()
    torch.testing.assert_close(fresh(x).logits, patched, atol=1e-5, rtol=0)
    sd_a, sd_b = model.state_dict(), fresh.state_dict()
    assert set(sd_a) == set(sd_b) == keys
    for k in sd_a:
        torch.testing.assert_close(sd_a[k], sd_b[k], atol=0, rtol=0, msg=k)
    mh.patch(fresh, estimator)
    torch.testing.assert_close(fresh(x).logits, patched, atol=1e-5, rtol=0)
    if estimator == "default_moe":
        assert all(bool(r.estimator.seen.any()) for r in mh.routers(model))
        for r in mh.routers(fresh):  # reset by the reload, as documented
            assert not bool(r.estimator.seen.any()) and float(r.estimator.defaults.abs().sum()) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_unpatch_restores_original(family):
    model = tiny(family)
    x = ids(11)
    ref = model(x).logits.detach()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    cls = mh.FAMILIES[family].block_class()
    count = sum(isinstance(m, cls) for m in model.modules())
    assert count == (1 if family == "deepseek_v3" else 2)  # DeepSeek-V3: first layer dense
    assert mh.patch(model, OTHER[family]) is model
    blocks = moe_blocks(model)
    assert len(blocks) == count and all(isinstance(b, cls) for b in blocks)
    assert all("forward" in b.__dict__ for b in blocks)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=0)
    mh.unpatch(model)
    assert not moe_blocks(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not any(isinstance(m, mh.HFRouter) for m in model.modules())
    torch.testing.assert_close(model(x).logits, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not patched"):
        mh.unpatch(model)
    mh.patch(model, SAME[family])  # patchable again after unpatch
    torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=0)


def _step(estimator, checkpoint=None, losses=None, **options):
    """One training forward + backward of a tiny Qwen3-MoE patched with ``estimator``;
    ``checkpoint``: None, "reentrant" or "non_reentrant" activation checkpointing."""
    model = tiny("qwen3_moe").train()
    if checkpoint is not None:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": checkpoint == "reentrant"})
    mh.patch(model, estimator, losses=losses, **options)
    x = ids(17)
    torch.manual_seed(3)  # the sampling estimators draw from the global RNG
    out = model(x, labels=x, use_cache=False)
    loss = out.loss  # with losses: the LM loss + moegrad's aux loss (out.aux_loss)
    if losses:
        assert float(out.aux_loss) > 0 and mh.routers(model)[0].aux_loss_in_outputs
    loss.backward()
    return model, loss.detach(), grads(model)


@pytest.mark.parametrize("checkpoint", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("estimator", ["default_moe", "gumbel", "noisy_topk", "dense"])
def test_activation_checkpointing_changes_nothing(estimator, checkpoint):
    """The recomputation in backward repeats the forward's samples (global RNG, restored by
    checkpointing) and skips its side effects: loss, every gradient, load_counts and
    default_moe's EMA equal a step without checkpointing."""
    ref_model, ref_loss, g_ref = _step(estimator)
    model, loss, g = _step(estimator, checkpoint)
    assert len(model.model.layers) == 2 and all(l.gradient_checkpointing for l in model.model.layers)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    assert set(g) == set(g_ref)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5, msg=name)
    for r, r_ref in zip(mh.routers(model), mh.routers(ref_model)):
        assert int(r.load_counts.sum()) == ids(17).numel() * 2  # counted once, not twice
        assert torch.equal(r.load_counts, r_ref.load_counts)
        assert torch.equal(r.last_routing.indices, r_ref.last_routing.indices)
        if estimator == "default_moe":  # one EMA update, not two
            assert bool(r.estimator.seen.any())
            torch.testing.assert_close(r.estimator.defaults, r_ref.estimator.defaults, atol=0, rtol=0)


def test_activation_checkpointing_with_moegrad_losses():
    """Non-reentrant (transformers' default): the moegrad losses train as without checkpointing.
    Reentrant runs the forward under no_grad: aux_loss refuses the gradient-less losses."""
    losses = {"switch": 0.5, "z_loss": 0.1}
    _, ref_loss, g_ref = _step("default_moe", losses=losses)
    _, loss, g = _step("default_moe", "non_reentrant", losses=losses)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(RuntimeError, match="carry no gradient.*use_reentrant=False"):
        _step("default_moe", "reentrant", losses=losses)


def test_generator_sampling_refused_with_activation_checkpointing():
    """A generator= is not restored by checkpointing: refused at patch time, or in backward
    when checkpointing was enabled after patch."""
    model = tiny("qwen3_moe").train()
    model.activation_checkpointing_enable()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"generator=.*gradient checkpointing enabled.*"
                       r"estimator='gumbel'"):
        mh.patch(model, "gumbel", generator=gen)
    assert not moe_blocks(model)
    mh.patch(model, "gumbel")  # the global RNG is fine (restored by checkpointing)

    model = tiny("qwen3_moe").train()
    mh.patch(model, "noisy_topk", generator=gen)
    x = ids(18)
    model(x, labels=x).loss.backward()  # no checkpointing: fine
    model.activation_checkpointing_enable()
    out = model(x, labels=x, use_cache=False)
    with pytest.raises(RuntimeError, match="estimator='noisy_topk' with generator= cannot run "
                       "under activation checkpointing"):
        out.loss.backward()


def test_deepcopy_of_patched_model_is_independent():
    import copy

    model = mh.patch(tiny("qwen3_moe"), "dense")
    x = ids(14)
    clone = copy.deepcopy(model)
    block, twin = model.model.layers[0].mlp, clone.model.layers[0].mlp
    assert twin.forward.__self__ is twin and twin.moegrad_router.gate is twin.gate
    assert clone.forward.__self__ is clone and model.forward.__self__ is model
    assert twin.moegrad_router.hf_experts.module is twin.experts
    with torch.no_grad():
        twin.gate.weight.mul_(-1.0)  # a different router in the copy only
    assert not torch.allclose(clone(x).logits, model(x).logits)
    assert block.moegrad_router.gate is block.gate


def test_train_eval_mode_follows_model():
    model = tiny("qwen3_moe")
    mh.patch(model, "default_moe")
    r = mh.routers(model)[0]
    assert not r.training and not r.estimator.training
    model.train()
    assert r.training and r.estimator.training
    model(ids(12))
    assert int(r.load_counts.sum()) == ids(12).numel() * 2
    assert bool(r.estimator.seen.any())
    assert not any("moegrad" in k for k in model.state_dict())


def test_bad_input():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*qwen3_moe \(Qwen3MoeSparseMoeBlock\)"):
        mh.patch(llama)
    with pytest.raises(TypeError, match="nn.Module"):
        mh.patch("model")
    model = tiny("qwen3_moe")
    with pytest.raises(ValueError, match="estimator='nope'.*topk"):
        mh.patch(model, "nope")
    with pytest.raises(ValueError, match="impl='fast'"):
        mh.patch(model, impl="fast")
    with pytest.raises(TypeError, match="unknown option"):
        mh.patch(model, "dense", beta=0.5)
    with pytest.raises(ValueError, match="importance_load"):
        mh.patch(model, "topk", losses={"importance_load": 1.0})
    with pytest.raises(ValueError, match="impl='hf'"):
        mh.patch(model, "default_moe", impl="hf")
    with pytest.raises(TypeError, match="allow_forward_change must be True or False, got str"):
        mh.patch(model, allow_forward_change="false")
    assert not moe_blocks(model)  # failed patches leave nothing behind
    mh.patch(model)
    with pytest.raises(ValueError, match="already patched"):
        mh.patch(model, "dense")
    with pytest.raises(ValueError, match="impl='bmm' is not available for gpt_oss"):
        mh.patch(tiny("gpt_oss"), impl="bmm")
    ds = tiny("deepseek_v3")
    for name in ("gumbel", "sparsemixer", "noisy_topk"):
        expect = f"estimator='{name}' samples.*deepseek_v3's group-limited top-k"
        with pytest.raises(ValueError, match=expect):
            mh.patch(ds, name)
    assert not moe_blocks(ds)


@pytest.mark.slow
def test_finetune_example_runs_briefly(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "finetune_hf.py"
    spec = importlib.util.spec_from_file_location("finetune_hf", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "curves.png"
    results = module.main(["--steps", "3", "--estimators", "topk,dense", "--dim", "32",
                           "--hidden", "32", "--seq", "16", "--batch", "2", "--layers", "1",
                           "--eval-batches", "1", "--out", str(out), "--quiet"])
    assert set(results) == {"topk", "dense"}
    for r in results.values():
        assert len(r["losses"]) == 3 and all(math.isfinite(v) for v in r["losses"])
        assert 3.0 < r["losses"][0] < 7.0  # about log(256) = 5.55 at random init
    # same weights, same batches, same forward: the first step's loss is identical
    assert results["topk"]["losses"][0] == pytest.approx(results["dense"]["losses"][0], abs=1e-6)
    assert out.stat().st_size > 1000


def test_phimoe_sparsemixer_keeps_its_routing():
    model = tiny("phimoe", router_aux_loss_coef=0.1)
    for m in model.modules():  # a real SparseMixer mask (several experts stay candidates)
        if hasattr(m, "router_jitter_noise"):
            m.router_jitter_noise = 0.5
    x = ids(13)
    ref = model(x, labels=x, output_router_logits=True)
    with pytest.raises(ValueError, match="estimator='dense' would change the forward of phimoe"):
        mh.patch(model, "dense")
    mh.patch(model, "sparsemixer")
    assert mh.routers(model)[0].estimator.jitter_eps == 0.5  # from the HF config
    out = model(x, labels=x, output_router_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=0)
    model.train()
    out = model(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert float(model.model.layers[0].mlp.router.weight.grad.abs().sum()) > 0


def test_non_silu_activation_uses_the_hf_activation():
    """A gelu config: the private loop with HF's act_fn, still equal to HF."""
    model = tiny("qwen3_moe", hidden_act="gelu").train()
    x = ids(15)
    ref = model(x, labels=x)
    ref.loss.backward()
    g_ref = grads(model)
    model.zero_grad()
    mh.patch(model, "topk")
    assert not mh.routers(model)[0].hf_experts.silu
    out = model(x, labels=x)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    for name, value in grads(model).items():
        torch.testing.assert_close(value, g_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_router_view_follows_the_router_contract():
    """HFRouter(x [B, S, D], mask) -> Routing like moegrad.Router, padding left out of counts."""
    model = tiny("qwen3_moe").train()
    mh.patch(model)
    router = mh.routers(model)[0]
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    r = router(x, mask)
    # composed, not a Router subclass (it owns no gate parameter), but found as a router
    assert moegrad.routing.is_router(router) and not isinstance(router, moegrad.Router)
    assert isinstance(router.config, moegrad.RouterConfig)
    assert (router.num_experts, router.top_k, router.bias) == (6, 2, None)
    assert r.shape == (2, 5) and r.indices.shape == (10, 2) and r.mask.sum() == 8
    expect = torch.bincount(r.indices[mask.reshape(-1)].reshape(-1), minlength=6)
    assert torch.equal(router.load_counts, expect)
    assert torch.equal(router.reset_load_counts(), expect) and not router.load_counts.any()
    gate = model.model.layers[0].mlp.gate
    torch.testing.assert_close(r.logits, F.linear(x.reshape(-1, 32), gate.weight))
    with pytest.raises(ValueError, match="feature size"):
        router(torch.randn(3, 7))


def test_noisy_topk_is_the_only_estimator_adding_keys():
    """noisy_topk learns a noise weight [E, D] per block: the one documented new key."""
    model = tiny("qwen3_moe")
    keys = set(model.state_dict())
    mh.patch(model, "noisy_topk")
    added = set(model.state_dict()) - keys
    assert added == {f"model.layers.{i}.mlp.moegrad_router.estimator.w_noise" for i in range(2)}
    assert all(model.state_dict()[k].shape == (6, 32) for k in added)
    model.train()
    x = ids(16)
    model(x, labels=x).loss.backward()
    assert model.model.layers[0].mlp.moegrad_router.estimator.w_noise.grad is not None
    mh.unpatch(model)
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("family", ["qwen3_moe", "phimoe", "gpt_oss"])
def test_pickle_of_patched_model(family, tmp_path):
    """pickle (and torch.save, which pickles) of a patched model gives a patched model with the
    same outputs, bound to its own modules; unpatch works on it and gives the HF forward back.
    (Pickled before any ``output_router_logits=True`` call: transformers then installs recording
    hooks that are local functions, which no pickle of an HF model survives, patched or not.)"""
    import pickle

    model = tiny(family)
    x = ids(19)
    plain = model(x).logits
    mh.patch(model, OTHER[family], losses={"switch": 0.5})
    model(x, labels=x)
    copies = [pickle.loads(pickle.dumps(model))]
    torch.save(model, tmp_path / "model.pt")
    copies.append(torch.load(tmp_path / "model.pt", weights_only=False))
    ref = model(x, labels=x, output_router_logits=True)
    gate = mh.FAMILIES[family].gate
    for clone in copies:
        block = clone.model.layers[0].mlp
        assert block.forward.__self__ is block and block.moegrad_router.gate is getattr(block, gate)
        assert clone.forward.__self__ is clone  # outputs.loss includes the aux loss (checked below)
        assert block.moegrad_router.hf_experts.module is block.experts
        out = clone(x, labels=x, output_router_logits=True)
        torch.testing.assert_close(out.logits, ref.logits, atol=0, rtol=0)
        torch.testing.assert_close(out.loss, ref.loss, atol=0, rtol=0)
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=0, rtol=0)
        assert float(out.aux_loss.detach()) > 0.5 and mh.routers(clone)[0].last_aux_loss is None
        assert len(mh.routers(clone)) == len(mh.routers(model)) == 2
        with torch.no_grad():
            getattr(block, gate).weight.mul_(-1.0)  # the copy's router only
        assert maxabs(clone(x).logits - ref.logits) > 1e-3
        torch.testing.assert_close(model(x).logits, ref.logits, atol=0, rtol=0)
        mh.unpatch(clone)
        assert not mh.routers(clone) and "forward" not in block.__dict__ | clone.__dict__
        with torch.no_grad():
            getattr(block, gate).weight.mul_(-1.0)
        torch.testing.assert_close(clone(x).logits, plain, atol=1e-5, rtol=0)


def test_phimoe_patch_draws_only_moegrads_sample(monkeypatch):
    """PhiMoE: transformers' router module draws its own SparseMixer sample. Patched, a training
    forward runs moegrad's SparseMixer once per layer and neither the HF router's forward nor
    HF's sparsemixer (no discarded sample); the gate's hooks still see x -> x W^T once per layer,
    output_router_logits records those logits, and HF's aux loss on them is unchanged."""
    from transformers.models.phimoe import modeling_phimoe as hf_phimoe
    from moegrad.estimators.sparsemixer import SparseMixer

    model = tiny("phimoe", router_aux_loss_coef=0.1)
    for m in model.modules():  # a real SparseMixer mask (several candidates per pick)
        if hasattr(m, "router_jitter_noise"):
            m.router_jitter_noise = 0.5
    mh.patch(model, "sparsemixer")
    model.train()
    calls = {"hf_router": 0, "hf_sparsemixer": 0, "moegrad": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(hf_phimoe.PhimoeTopKRouter, "forward",
                        counted("hf_router", hf_phimoe.PhimoeTopKRouter.forward))
    monkeypatch.setattr(hf_phimoe, "sparsemixer", counted("hf_sparsemixer", hf_phimoe.sparsemixer))
    monkeypatch.setattr(SparseMixer, "route", counted("moegrad", SparseMixer.route))
    seen = []
    gates = [layer.mlp.router for layer in model.model.layers]
    for gate in gates:
        gate.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out)))
    x = ids(20)
    torch.manual_seed(4)
    out = model(x, labels=x, output_router_logits=True)
    assert calls == {"hf_router": 0, "hf_sparsemixer": 0, "moegrad": 2}
    assert [m for m, _, _ in seen] == gates and len(out.router_logits) == 2
    for (gate, inp, o), z in zip(seen, out.router_logits):
        assert o[1] is None and o[2] is None and o[0] is z
        torch.testing.assert_close(z, inp @ gate.weight.T, atol=1e-6, rtol=0)
    expect = hf_phimoe.load_balancing_loss_func(out.router_logits, 6, 2, None)
    torch.testing.assert_close(out.aux_loss, expect, atol=1e-7, rtol=0)
    mh.unpatch(model)  # the HF router module samples again
    model(x)
    assert calls["hf_router"] == 2 and calls["hf_sparsemixer"] == 2 and calls["moegrad"] == 2


def test_phimoe_input_jitter_in_training_matches():
    """PhiMoE applies its input jitter twice in training (block, then router in place); with a
    mask that leaves one candidate (deterministic SparseMixer) the patched training forward
    equals HF's under the same seed: the same jitter draws in the same order. (One layer: the
    SparseMixer draws, HF's and moegrad's, differ in number, which shifts later layers' jitter.)"""
    model = tiny("phimoe", input_jitter_noise=0.2, num_hidden_layers=1).train()
    assert model.model.layers[0].mlp.router.input_jitter_noise == 0.2
    x = ids(21)
    torch.manual_seed(5)
    ref = model(x).logits
    torch.manual_seed(6)
    assert maxabs(model(x).logits - ref) > 1e-4  # the jitter is random
    mh.patch(model, "sparsemixer")
    torch.manual_seed(5)
    torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=0)


def lm_loss(logits, labels):
    """Independent causal-LM loss: mean cross-entropy of the logits at t against labels at t+1."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, v), labels[:, 1:].reshape(-1))


def test_trainer_trains_on_lm_loss_plus_moegrad_aux_loss(tmp_path):
    """transformers.Trainer trains on outputs.loss. After patch(losses={"switch": 0.5}) that is,
    at each of 3 steps, the LM loss + moegrad's aux loss, both recomputed here (cross-entropy of
    the logits; 0.5 E sum_i f_i P_i per layer from z = x W^T of the block input), and the
    family's own aux loss is not added although output_router_logits=True asks transformers for
    it. The router weight gradient of the loss equals that of the independent sum, whose aux
    part alone is not zero: the router receives the balance gradient."""
    pytest.importorskip("accelerate")
    model = tiny("qwen3_moe", router_aux_loss_coef=0.3, output_router_logits=True)
    mh.patch(model, "dense", losses={"switch": 0.5})
    blocks = [layer.mlp for layer in model.model.layers]
    gates = [b.gate.weight for b in blocks]
    block_inputs = {}
    for b in blocks:
        b.register_forward_pre_hook(lambda m, args: block_inputs.__setitem__(m, args[0]))
    before = [g.detach().clone() for g in gates]
    checked = []

    class CheckedTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
            ce = lm_loss(out.logits, inputs["labels"])
            aux = 0.0
            for b in blocks:
                z = block_inputs[b].reshape(-1, 32) @ b.gate.weight.T  # [T, E]
                p = torch.softmax(z, -1)
                f = torch.zeros_like(p).scatter(1, p.topk(2, -1).indices, 1.0).mean(0)
                aux = aux + 0.5 * 6 * (f * p.mean(0)).sum()
            torch.testing.assert_close(loss, ce + aux, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.aux_loss, aux, atol=1e-6, rtol=0)
            assert len(out.router_logits) == 2
            g = torch.autograd.grad(loss, gates, retain_graph=True)
            g_ref = torch.autograd.grad(ce + aux, gates, retain_graph=True)
            g_aux = torch.autograd.grad(aux, gates, retain_graph=True)
            for a, r, ra in zip(g, g_ref, g_aux):
                torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)
                assert maxabs(ra) > 1e-4
            checked.append((float(loss.detach()), float(ce.detach()), float(aux.detach())))
            return (loss, out) if return_outputs else loss

    g = torch.Generator().manual_seed(8)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(2, 64, (6, 9), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0)
    trainer = CheckedTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert trainer.state.global_step == 3 and len(checked) == 3
    assert all(aux > 0.5 * 2 * 2 * 0.9 for _, _, aux in checked)  # 0.5 * layers * (>= K at balance)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([c[0] for c in checked], abs=1e-4)
    assert all(maxabs(g - b) > 0 for g, b in zip(gates, before))


@pytest.mark.parametrize("family", FAMILIES)
def test_exactly_one_balance_loss_reaches_outputs_loss(family):
    """With labels, moegrad's configured aux loss A is in outputs.loss and outputs.aux_loss,
    whether or not output_router_logits asks transformers for the family's own (never both);
    return_dict=False gives the same (loss, aux_loss, logits, ...); a later aux_loss(model) warns
    and returns 0 (not counted twice). Without labels nothing is added and aux_loss reads A."""
    model = tiny(family, router_aux_loss_coef=0.3).train()
    x = ids(22)
    own = model(x, labels=x, output_router_logits=True)
    if family != "deepseek_v3":  # transformers' DeepSeek-V3 has no router aux loss
        torch.testing.assert_close(own.loss, lm_loss(own.logits, x) + 0.3 * own.aux_loss)
        assert float(own.aux_loss.detach()) > 0.5
    coefficients = {"switch": 0.5, "z_loss": 0.1}
    mh.patch(model, SAME[family], losses=coefficients)

    def moegrad_aux():  # the weighted losses each block stored (kept detached once consumed)
        return sum(c * r.last_losses[n] for r in mh.routers(model) for n, c in coefficients.items())

    for record in (False, True):
        out = model(x, labels=x, output_router_logits=record)
        aux = moegrad_aux()
        assert float(aux.detach()) > 1.0
        torch.testing.assert_close(out.loss, lm_loss(out.logits, x) + aux, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.aux_loss, aux, atol=1e-6, rtol=0)
        layers = len(mh.routers(model))  # DeepSeek-V3: its first layer is dense
        assert (out.router_logits is not None and len(out.router_logits) == layers) == record
        torch.testing.assert_close(out.logits, own.logits, atol=1e-5, rtol=0)
        with pytest.warns(UserWarning, match="already in outputs.loss"):
            assert mh.aux_loss(model).item() == 0.0
    tup = model(x, labels=x, return_dict=False)
    torch.testing.assert_close(tup[0], lm_loss(tup[2], x) + moegrad_aux(), atol=1e-5, rtol=0)
    torch.testing.assert_close(tup[1], moegrad_aux(), atol=1e-6, rtol=0)
    out = model(x)  # no labels: nothing added, the stored losses read by hand
    assert out.loss is None and out.aux_loss is None
    expect = moegrad_aux()
    torch.testing.assert_close(mh.aux_loss(model), expect, atol=1e-6, rtol=0)


def test_no_balance_loss_warns_and_unpatch_restores_the_loss():
    """A training forward with labels that adds no balance loss (no losses=, the family's own
    off) warns; with output_router_logits, in eval, or for DeepSeek-V3 (no router aux loss) it
    does not. unpatch gives the HF forward and loss back."""
    import warnings as w

    model = tiny("qwen3_moe", router_aux_loss_coef=0.3).train()
    x = ids(23)
    ref = model(x, labels=x, output_router_logits=True)
    mh.patch(model, "dense")
    with pytest.warns(UserWarning, match="adds no balance loss.*output_router_logits is off"):
        model(x, labels=x)
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        out = model(x, labels=x, output_router_logits=True)
        model.eval()
        model(x, labels=x)
        ds = mh.patch(tiny("deepseek_v3").train(), "topk")
        ds(x, labels=x)
    assert not [c for c in caught if "balance loss" in str(c.message)]
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)  # the family's own
    mh.patch(mh.unpatch(model), "dense", losses={"switch": 0.5})
    assert "forward" in model.__dict__
    mh.unpatch(model)
    assert "forward" not in model.__dict__ and "forward" not in model.model.layers[0].mlp.__dict__
    model.train()
    out = model(x, labels=x, output_router_logits=True)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
