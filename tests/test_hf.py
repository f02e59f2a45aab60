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


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_hf_aux_loss_unchanged(family):
    model = tiny(family, router_aux_loss_coef=0.3).train()
    x = ids(2)
    ref = model(x, labels=x, output_router_logits=True)
    mh.patch(model, "dense")
    out = model(x, labels=x, output_router_logits=True)
    assert ref.aux_loss is not None and float(ref.aux_loss.detach()) > 0
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert len(out.router_logits) == model.config.num_hidden_layers


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


def test_top1_renormalised_router_learns_only_with_dense_estimators():
    """K=1 with norm_topk_prob: the combine weight is the constant 1, topk gives the router 0."""
    x = ids(4)

    def router_grad(name):
        model = tiny("qwen3_moe", num_experts_per_tok=1, norm_topk_prob=True).train()
        for m in model.modules():  # HF reads K from its router module
            if hasattr(m, "top_k"):
                m.top_k = 1
        mh.patch(model, name)
        if name == "default_moe":  # one step to fill the default outputs
            model(x)
        model.zero_grad()
        out = model(x, labels=x)
        out.loss.backward()
        gates = [p.grad for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
        return out.logits.detach(), torch.stack([g if g is not None else torch.zeros(1) for g in gates])

    logits_topk, g_topk = router_grad("topk")
    # topk: d(s/s)/ds is 0 up to rounding; the estimators give a real gradient
    assert float(g_topk.abs().max()) < 1e-9
    for estimator in ("dense", "default_moe", "straight_through"):
        logits_est, g_est = router_grad(estimator)
        assert float(g_est.abs().max()) > 1e-4, estimator
        torch.testing.assert_close(logits_est, logits_topk, atol=1e-5, rtol=0, msg=estimator)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_dense_router_gradient_matches_independent_reference(family):
    """One block: dense's router gradient equals autograd of HF's own sparse output plus
    sum_{i not in S} c (s_i - sg(s_i)) E_i(x), with E_i(x) from HF's experts module."""
    model = tiny(family).train()
    block = next(m for m in model.modules() if type(m).__name__ in
                 ("Qwen3MoeSparseMoeBlock", "DeepseekV3MoE", "GptOssMLP"))
    gate = block.router if family == "gpt_oss" else block.gate
    x = torch.randn(2, 5, 32)
    g = torch.randn(2, 5, 32)
    mh.patch(model, "dense")
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    if family == "deepseek_v3":
        out = out - block.shared_experts(x)
    (out * g).sum().backward()
    got = gate.weight.grad.clone()
    gate.weight.grad = None
    mh.unpatch(model)

    flat = x.reshape(-1, 32)
    z, w, idx = gate(flat)  # HF's own selection and differentiable top-k weights
    z = z.float()
    s = torch.sigmoid(z) if family == "deepseek_v3" else torch.softmax(z, -1)
    c = 2.5 if family == "deepseek_v3" else 1.0
    num_experts = s.shape[1]
    y = block.experts(flat, idx, w)
    for e in range(num_experts):
        with torch.no_grad():
            ones = torch.ones(flat.shape[0], 1)
            e_out = block.experts(flat, torch.full((flat.shape[0], 1), e), ones)  # [T, D]
        unselected = (idx != e).all(-1, keepdim=True).float()
        y = y + unselected * c * (s[:, e:e + 1] - s[:, e:e + 1].detach()) * e_out
    (y.view_as(x) * g).sum().backward()
    assert float(got.abs().sum()) > 0
    torch.testing.assert_close(got, gate.weight.grad, atol=1e-6, rtol=1e-4)


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


def test_save_pretrained_round_trip(tmp_path):
    estimator = "default_moe"  # has estimator state: non-persistent, not saved
    model = tiny("qwen2_moe").train()
    mh.patch(model, estimator)
    x = ids(10)
    model(x)  # default_moe fills its (non-persistent) defaults
    model.eval()
    patched = model(x).logits
    model.save_pretrained(tmp_path)
    fresh = type(model).from_pretrained(tmp_path).float().eval()
    torch.testing.assert_close(fresh(x).logits, patched, atol=1e-5, rtol=0)
    sd_a, sd_b = model.state_dict(), fresh.state_dict()
    assert set(sd_a) == set(sd_b)
    for k in sd_a:
        torch.testing.assert_close(sd_a[k], sd_b[k], atol=0, rtol=0, msg=k)
    mh.patch(fresh, estimator)
    torch.testing.assert_close(fresh(x).logits, patched, atol=1e-5, rtol=0)


def test_patch_unpatch_restores_original():
    model = tiny("olmoe")
    x = ids(11)
    ref = model(x).logits
    assert mh.patch(model, "dense") is model
    blocks = moe_blocks(model)
    assert len(blocks) == 2 and all("forward" in b.__dict__ for b in blocks)
    mh.unpatch(model)
    assert not moe_blocks(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not any(isinstance(m, mh.HFRouter) for m in model.modules())
    torch.testing.assert_close(model(x).logits, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not patched"):
        mh.unpatch(model)


def test_deepcopy_of_patched_model_is_independent():
    import copy

    model = mh.patch(tiny("qwen3_moe"), "dense")
    x = ids(14)
    clone = copy.deepcopy(model)
    block, twin = model.model.layers[0].mlp, clone.model.layers[0].mlp
    assert twin.forward.__self__ is twin and twin.moegrad_router.gate is twin.gate
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
    assert isinstance(router, moegrad.Router)
    assert r.shape == (2, 5) and r.indices.shape == (10, 2) and r.mask.sum() == 8
    expect = torch.bincount(r.indices[mask.reshape(-1)].reshape(-1), minlength=6)
    assert torch.equal(router.load_counts, expect)
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
