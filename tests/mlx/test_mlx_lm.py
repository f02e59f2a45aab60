"""moegrad.mlx.lm: patching mlx-lm's Mixtral / Qwen3-MoE blocks (tiny random configs, no download).
Same forward as stock; with top-1 the stock router gets no gradient and dense fixes it. Quantized
models (nn.quantize) and LoRA-wrapped gates/experts go through the layers' own calls."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.mlx import need  # noqa: E402

mx = need("mlx.core")
need("mlx_lm")

import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from moegrad.mlx import lm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from mlx_router import tiny_model, train_routers  # noqa: E402

TOKENS = mx.random.randint(0, 64, (4, 17), key=mx.random.key(1))


def gate_grads(model, suffix="gate.weight"):
    def loss_fn(m):
        return nn.losses.cross_entropy(m(TOKENS[:, :-1]), TOKENS[:, 1:], reduction="mean")

    _, grads = nn.value_and_grad(model, loss_fn)(model)
    return {k: v for k, v in tree_flatten(grads) if k.endswith(suffix)}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_patch_keeps_the_forward_and_unpatch_restores(family, top_k):
    model = tiny_model(family, top_k)
    ref = model(TOKENS)
    assert lm.patch(model, estimator="dense") == 2
    blocks = [b for _, b in model.named_modules() if isinstance(b, lm.MoEBlock)]
    assert len(blocks) == 2 and blocks[0].family == family
    assert float(mx.abs(model(TOKENS) - ref).max()) < 1e-5
    names = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert any(k.endswith("gate.weight") for k in names) and any("switch_mlp" in k for k in names)
    assert lm.unpatch(model) == 2
    assert not any(isinstance(b, lm.MoEBlock) for _, b in model.named_modules())
    assert float(mx.abs(model(TOKENS) - ref).max()) == 0.0


def test_top1_stock_router_gets_nothing_dense_gets_the_gradient():
    stock = tiny_model("mixtral", 1)
    g_stock = gate_grads(stock)
    assert len(g_stock) == 2
    assert all(float(mx.abs(g).max()) == 0.0 for g in g_stock.values())
    patched = tiny_model("mixtral", 1)
    lm.patch(patched, estimator="topk")  # moegrad's topk reproduces the failure
    assert all(float(mx.abs(g).max()) < 1e-7 for g in gate_grads(patched).values())
    lm.patch(patched, estimator="dense")
    assert all(float(mx.abs(g).max()) > 1e-4 for g in gate_grads(patched).values())


def test_router_only_training_learns_with_dense_only():
    stock = tiny_model("mixtral", 1)
    before = {k: np.array(v) for k, v in tree_flatten(stock.parameters()) if k.endswith("gate.weight")}
    losses_stock = train_routers(stock, TOKENS, steps=12)
    after = {k: np.array(v) for k, v in tree_flatten(stock.parameters()) if k.endswith("gate.weight")}
    assert all(np.array_equal(before[k], after[k]) for k in before)  # the routers never moved
    assert losses_stock[-1] == pytest.approx(losses_stock[0], abs=1e-6)
    patched = tiny_model("mixtral", 1)
    lm.patch(patched, estimator="dense")
    losses_dense = train_routers(patched, TOKENS, steps=12)
    assert losses_dense[0] == pytest.approx(losses_stock[0], abs=1e-5)
    assert losses_dense[-1] < losses_dense[0] - 0.05


def test_default_moe_and_balance_losses_in_a_patched_model():
    model = tiny_model("qwen3_moe", 2)
    lm.patch(model, estimator="default_moe", losses={"switch": 1e-2, "z_loss": 1e-3})
    model(TOKENS)
    aux = lm.aux_loss(model)
    assert float(aux) > 0
    block = model.model.layers[0].mlp
    assert float(mx.abs(block.estimator.defaults).sum()) > 0  # the EMA saw the experts' outputs
    with pytest.raises(ValueError, match="no supported MoE block"):
        lm.patch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="cannot patch"):
        lm.MoEBlock(nn.Linear(2, 2))


# -- quantized models (nn.quantize; the usual starting point of a fine-tune) and LoRA adapters

def tiny_quantizable(family: str, top_k: int):
    """tiny_model with 64-wide experts, so every MoE matrix splits into quantization groups of 32."""
    mx.random.seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=top_k, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False)
    if family == "mixtral":
        from mlx_lm.models import mixtral
        return mixtral.Model(mixtral.ModelArgs(model_type="mixtral", intermediate_size=64,
                                               num_local_experts=4, **common))
    from mlx_lm.models import qwen3_moe
    return qwen3_moe.Model(qwen3_moe.ModelArgs(
        model_type="qwen3_moe", intermediate_size=64, moe_intermediate_size=64, num_experts=4,
        decoder_sparse_step=1, mlp_only_layers=[], head_dim=8, max_position_embeddings=128,
        norm_topk_prob=True, **common))


def moe_layers(model):
    return {name: type(m).__name__ for name, m in model.named_modules()
            if "_original" not in name and (name.endswith(".gate") or "switch_mlp." in name)
            and not name.endswith(".activation")}


def dequantized_experts(model):
    """Replace every QuantizedSwitchLinear by a SwitchLinear holding mx.dequantize of its weight."""
    from mlx_lm.models.switch_layers import SwitchLinear

    for _, m in model.named_modules():
        if type(m).__name__ != "SwitchGLU":
            continue
        for key in ("gate_proj", "up_proj", "down_proj"):
            q = m[key]
            plain = SwitchLinear(q.input_dims, q.output_dims, q.num_experts, bias=False)
            plain.weight = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits,
                                         mode=q.mode)
            setattr(m, key, plain)
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_quantized_model_keeps_the_stock_forward(family):
    model = tiny_quantizable(family, 2)
    nn.quantize(model, group_size=32, bits=4)
    layers = moe_layers(model)
    assert set(layers.values()) == {"QuantizedLinear", "QuantizedSwitchLinear"}, layers
    ref = model(TOKENS)
    assert lm.patch(model, estimator="dense") == 2
    block = model.model.layers[0].mlp if family == "qwen3_moe" else model.model.layers[0].block_sparse_moe
    assert (block.config.dim, block.num_experts, block.top_k) == (32, 4, 2)  # not the packed width
    assert lm.SwitchExperts(block.switch_mlp).stacked_weights() is None  # no float weights
    assert float(mx.abs(model(TOKENS) - ref).max()) < 1e-5
    # the dense backward runs the quantized experts too; what is trainable (the norms) learns
    norms = gate_grads(model, "norm.weight")
    assert norms and all(bool(mx.isfinite(g).all()) for g in norms.values())
    assert max(float(mx.abs(g).max()) for g in norms.values()) > 1e-4
    assert lm.unpatch(model) == 2
    assert float(mx.abs(model(TOKENS) - ref).max()) == 0.0


def test_quantized_experts_dense_gradient_equals_the_dequantized_model():
    """Quantized experts, float gate (what a router fine-tune trains): the dense router gradient
    through the experts' own gather_qmm call equals the one on the dequantized weights."""
    def build():
        model = tiny_quantizable("mixtral", 1)
        nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: "switch_mlp" in p
                    and hasattr(m, "to_quantized"))
        return model

    quantized = build()
    assert set(moe_layers(quantized).values()) == {"Linear", "QuantizedSwitchLinear"}
    g_stock = gate_grads(quantized)
    assert all(float(mx.abs(g).max()) == 0.0 for g in g_stock.values())  # top-1: nothing
    reference = dequantized_experts(build())
    assert float(mx.abs(reference(TOKENS) - quantized(TOKENS)).max()) < 1e-5
    lm.patch(quantized, estimator="dense")
    lm.patch(reference, estimator="dense")
    g_q, g_ref = gate_grads(quantized), gate_grads(reference)
    assert sorted(g_q) == sorted(g_ref) and len(g_q) == 2
    for key in g_q:
        scale = float(mx.abs(g_ref[key]).max())
        assert scale > 1e-4
        assert float(mx.abs(g_q[key] - g_ref[key]).max()) < 1e-5 * scale, key


def test_lora_on_a_quantized_model_before_and_after_patch():
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers

    config = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    model = tiny_quantizable("mixtral", 1)
    nn.quantize(model, group_size=32, bits=4)
    linear_to_lora_layers(model, 2, config)  # wraps the gates and the expert projections too
    for i, (_, m) in enumerate(model.named_modules()):
        if "lora_b" in m:  # make the adapters matter
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape, key=mx.random.key(i))
    ref = model(TOKENS)
    assert gate_grads(model) == {}  # the gates are LoRA-wrapped: they learn through lora_a/lora_b
    stock = gate_grads(model, "block_sparse_moe.gate.lora_b")
    assert len(stock) == 2 and all(float(mx.abs(g).max()) == 0.0 for g in stock.values())  # top-1

    lm.patch(model, estimator="dense")  # LoRA first, then patch
    assert float(mx.abs(model(TOKENS) - ref).max()) < 1e-5
    for suffix in ("gate.lora_a", "gate.lora_b"):
        dense = gate_grads(model, suffix)
        assert len(dense) == 2 and all(float(mx.abs(g).max()) > 1e-5 for g in dense.values())

    # patch first, then LoRA: unpatch keeps the adapters the patched blocks were given
    model = tiny_quantizable("qwen3_moe", 2)
    nn.quantize(model, group_size=32, bits=4)
    lm.patch(model, estimator="dense")
    linear_to_lora_layers(model, 2, config)
    block = model.model.layers[0].mlp
    assert isinstance(block.gate, LoRALinear)
    block.gate.lora_b = 0.05 * mx.random.normal(block.gate.lora_b.shape, key=mx.random.key(5))
    patched = model(TOKENS)
    lm.unpatch(model)
    assert model.model.layers[0].mlp.gate is block.gate
    assert float(mx.abs(model(TOKENS) - patched).max()) < 1e-5


def test_unsupported_gate_and_expert_layers_are_refused_at_patch_time():
    model = tiny_quantizable("mixtral", 2)
    block = model.model.layers[0].block_sparse_moe
    block.gate = nn.Sequential(block.gate)
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock: its gate is a Sequential; supported"):
        lm.patch(model)
    model = tiny_quantizable("qwen3_moe", 2)
    model.model.layers[1].mlp.switch_mlp.down_proj = nn.Linear(64, 32, bias=False)
    with pytest.raises(ValueError, match=r"its experts hold \['Linear'\] layers"):
        lm.patch(model)
    model = tiny_quantizable("qwen3_moe", 2)
    model.model.layers[0].mlp.gate = nn.Linear(32, 4, bias=True)
    with pytest.raises(ValueError, match="gate has a bias"):
        lm.patch(model)


def test_switch_experts_are_moegrad_experts_by_role():
    """SwitchExperts: ExpertWeights(gate, up, down) of the SwitchGLU; its call on expert-sorted
    rows and every_expert equal the SwitchGLU's own output per (token, expert)."""
    from moegrad._interfaces import ExpertWeights

    model = tiny_model("mixtral", 2)
    mlp = model.model.layers[0].block_sparse_moe.switch_mlp
    experts = lm.SwitchExperts(mlp)
    weights = experts.stacked_weights()
    assert isinstance(weights, ExpertWeights) and weights.activation == "swiglu"
    assert weights.gate is mlp.gate_proj.weight and weights.up is mlp.up_proj.weight
    assert weights.down is mlp.down_proj.weight
    x = mx.random.normal((5, experts.dim), key=mx.random.key(3))
    every = mx.broadcast_to(mx.arange(experts.num_experts, dtype=mx.uint32), (5, experts.num_experts))
    ref = mlp(x, every).astype(mx.float32)  # [5, E, D]
    assert float(mx.abs(experts.every_expert(x, weights) - ref).max()) < 1e-5
    assert float(mx.abs(experts.every_expert(x) - ref).max()) < 1e-5
    ids = mx.array([0, 0, 1, 3, 3], dtype=mx.uint32)
    rows = experts(x, ids)  # [5, D]: row n through expert ids[n]
    assert rows.shape == (5, experts.dim)
    assert float(mx.abs(rows - ref[mx.arange(5), ids]).max()) < 1e-5



def test_sinkhorn_routing_in_a_patched_model_and_the_other_routings_refused():
    model = tiny_model("qwen3_moe", 2)
    ref = model(TOKENS)
    assert lm.patch(model, estimator="dense", routing="sinkhorn") == 2
    blocks = [b for _, b in model.named_modules() if isinstance(b, lm.MoEBlock)]
    assert all(b.config.routing == "sinkhorn" for b in blocks)
    model.eval()  # eval: plain top-k, mlx-lm's forward
    assert float(mx.abs(model(TOKENS) - ref).max()) < 1e-5
    model.train()
    x = mx.random.normal((40, blocks[0].config.dim))
    r = blocks[0].route(x, blocks[0].gate_logits(x), (40,))
    from moegrad.mlx.selection import sinkhorn
    want = np.argsort(-np.array(sinkhorn(r.scores)), axis=-1, kind="stable")[:, :2]
    assert np.array_equal(np.sort(np.array(r.indices), -1), np.sort(want, -1))
    assert all(float(mx.abs(g).max()) > 0 for g in gate_grads(model).values())
    for routing in ("expert_choice", "remoe"):
        with pytest.raises(ValueError, match=f"routing='{routing}' is not supported by moegrad.mlx.lm.patch"):
            lm.patch(tiny_model("qwen3_moe", 2), routing=routing)
