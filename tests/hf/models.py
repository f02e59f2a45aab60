"""Tiny random-init transformers MoE models and helpers shared by the moegrad.hf tests.

Shapes: B batch, S sequence, T tokens, D hidden, E experts, K top-k.
"""

from __future__ import annotations

import torch
import transformers

import moegrad.hf as mh


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
