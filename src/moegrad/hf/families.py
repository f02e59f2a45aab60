"""The transformers MoE families :func:`moegrad.hf.patch` supports and how each one routes.

A :class:`Family` names an HF sparse MoE block class and reads, from a block instance, the
:class:`moegrad.RouterConfig` equal to its gate's rule: scores s = softmax(z) or sigmoid(z)
[T, E], top-k S [T, K] (DeepSeek-V3: group-limited, on s + e_score_correction_bias), weights
c * s_S (/ sum_S s when the family renormalises). Per-family notes: docs/hf.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from torch import nn

from moegrad.routing import RouterConfig

__all__ = ["Family", "FAMILIES", "supported"]


@dataclass(frozen=True)
class Family:
    """How one transformers MoE block routes. ``module``/``block`` name the HF block class."""

    name: str
    module: str
    block: str
    score: str  # "softmax" or "sigmoid"
    gate: str = "gate"  # attribute of the block holding the router module (weight [E, D])
    shared: Optional[str] = None  # None, "gated" (Qwen2-MoE) or "plain" (DeepSeek-V3)
    jitter: Optional[str] = None  # block attribute of a multiplicative input jitter (training)
    #: the HF gate module samples its own routing (PhiMoE's SparseMixer): patch gives it a
    #: logits-only forward, so only moegrad draws
    gate_samples: bool = False
    #: gate attribute of a second input jitter the HF gate applies in place (PhiMoE)
    gate_jitter: Optional[str] = None
    correction_bias: bool = False  # DeepSeek-V3's e_score_correction_bias + group-limited top-k
    #: the only estimators that keep this family's forward (None: any)
    estimators: Optional[tuple] = None
    #: expert layout: "fused" (gate_up_proj [E, 2H, D] = [gate; up], SwiGLU) or "gpt_oss"
    #: (gate_up_proj [E, D, 2H] interleaved, biases, clamped GLU)
    experts: str = "fused"
    #: the block returns (hidden_states, combine weights [T, K]) (GPT-OSS)
    returns_weights: bool = False

    def block_class(self):
        """The HF block class, or None if its module is not loaded (then no model holds one)."""
        module = sys.modules.get(self.module)
        return getattr(module, self.block, None) if module is not None else None

    def router_config(self, block: nn.Module, routing: str = "topk") -> RouterConfig:
        """The :class:`RouterConfig` equal to the HF gate's routing rule (``routing="topk"``);
        ``routing="sinkhorn"`` balances the training-mode selection (:class:`moegrad.Router`),
        which a family with a selection bias (DeepSeek-V3) refuses."""
        gate, experts = _unwrap(getattr(block, self.gate)), _unwrap(block.experts)
        dim, num_experts = gate.weight.shape[1], gate.weight.shape[0]
        if experts.gate_up_proj.shape[0] != num_experts or experts.down_proj.shape[0] != num_experts:
            raise ValueError(f"{type(block).__name__}: gate has {num_experts} experts but experts "
                             f"hold {experts.gate_up_proj.shape[0]}")
        top_k, normalize, scale, groups = int(gate.top_k), False, 1.0, (None, None)
        if self.name in ("mixtral", "gpt_oss"):  # GPT-OSS: softmax of the K top logits, the same
            normalize = True
        elif self.name == "phimoe":
            top_k = 2  # transformers' PhiMoE sparsemixer always makes two picks
        elif self.correction_bias:
            normalize, scale = bool(gate.norm_topk_prob), float(gate.routed_scaling_factor)
            groups = (int(gate.num_group), int(gate.topk_group))
        else:
            normalize = bool(gate.norm_topk_prob)
        return RouterConfig(dim, num_experts, top_k, score=self.score, normalize=normalize,
                            routed_scaling_factor=scale, n_group=groups[0], topk_group=groups[1],
                            selection_bias=self.correction_bias, check_finite=False,
                            routing=routing)

    def default_options(self, block: nn.Module, estimator: str) -> dict:
        """Estimator options taken from the HF config (PhiMoE: jitter_eps)."""
        if self.name == "phimoe" and estimator == "sparsemixer":
            return {"jitter_eps": float(_unwrap(getattr(block, self.gate)).router_jitter_noise)}
        return {}


_M = "transformers.models.{0}.modeling_{0}"
#: supported families by name
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("mixtral", _M.format("mixtral"), "MixtralSparseMoeBlock", "softmax", jitter="jitter_noise"),
    Family("qwen2_moe", _M.format("qwen2_moe"), "Qwen2MoeSparseMoeBlock", "softmax", shared="gated"),
    Family("qwen3_moe", _M.format("qwen3_moe"), "Qwen3MoeSparseMoeBlock", "softmax"),
    Family("olmoe", _M.format("olmoe"), "OlmoeSparseMoeBlock", "softmax"),
    Family("deepseek_v3", _M.format("deepseek_v3"), "DeepseekV3MoE", "sigmoid", shared="plain",
           correction_bias=True),
    Family("phimoe", _M.format("phimoe"), "PhimoeSparseMoeBlock", "softmax", gate="router",
           jitter="input_jitter_noise", estimators=("sparsemixer",), gate_samples=True,
           gate_jitter="input_jitter_noise"),
    Family("gpt_oss", _M.format("gpt_oss"), "GptOssMLP", "softmax", gate="router",
           experts="gpt_oss", returns_weights=True),
)}


def supported() -> list[str]:
    """'family (BlockClass)' for every supported family."""
    return [f"{f.name} ({f.block})" for f in FAMILIES.values()]


def _unwrap(module: nn.Module) -> nn.Module:
    """The module under PEFT wrappers (peft's ``lora.ParamWrapper``, ``lora.Linear``: the
    ``base_layer`` chain), or ``module`` itself."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _family_of(block: nn.Module) -> Optional[Family]:
    """The family whose block class ``block`` is an instance of (None: not a supported block)."""
    for family in FAMILIES.values():
        cls = family.block_class()
        if cls is not None and isinstance(block, cls):
            return family
    return None

