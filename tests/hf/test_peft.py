"""moegrad.hf with PEFT LoRA (peft's lora.Linear on attention, lora.ParamWrapper on the router
gate weight and the fused 3-D expert weights) on a tiny random Qwen3-MoE: training with every
estimator in both orders (patch then get_peft_model, and the reverse), the gate LoRA gradient
against plain autograd through W + s B A, equal logits, unpatch and merge_and_unload.

Shapes: B batch, S sequence, D hidden, E experts, r LoRA rank; gate W [E, D], A [r, D],
B [E, r], s = lora_alpha / r.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import moegrad.estimators as me  # noqa: E402
import moegrad.hf as mh  # noqa: E402
from tests.hf.models import ids, tiny  # noqa: E402

R, ALPHA = 2, 4  # s = 2
GATE = ["mlp.gate.weight"]  # Qwen3MoeSparseMoeBlock.gate: Qwen3MoeTopKRouter, weight [E, D] (not an nn.Linear)
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # [E, 2H, D], [E, D, H]
ORDERS = ["patch_then_peft", "peft_then_patch"]


def lora_config(attention=True, experts=True):
    """init_lora_weights=False: B != 0 too, so A has a gradient from the first step."""
    return peft.LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights=False,
                           target_modules=["q_proj", "v_proj"] if attention else [],
                           target_parameters=GATE + (EXPERTS if experts else []))


def adapted(order, experts=True, attention=True, **patch_kw):
    """A tiny Qwen3-MoE (train mode) patched by moegrad and wrapped by peft, in ``order``."""
    model = tiny("qwen3_moe").train()
    if order == "patch_then_peft":
        mh.patch(model, **patch_kw)
        torch.manual_seed(1)
        return peft.get_peft_model(model, lora_config(attention, experts))
    torch.manual_seed(1)
    model = peft.get_peft_model(model, lora_config(attention, experts))
    mh.patch(model, **patch_kw)
    return model


def task_loss(logits, x):
    """Causal-LM cross entropy of the shifted logits (what transformers' loss computes)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))


def is_base(name):
    return "lora_" not in name and "moegrad_router" not in name


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("estimator", me.available())
def test_lora_trains_only_adapters(estimator, order):
    """3 AdamW steps (no weight decay: a change comes from a gradient) on outputs.loss =
    cross entropy + moegrad's switch loss: every adapter (attention, gate, experts) changes,
    every base weight stays bit-identical, the router-gate LoRA gets a gradient."""
    model = adapted(order, estimator=estimator, losses={"switch": 1e-2}, allow_forward_change=True)
    names = [n for n, _ in model.named_parameters()]
    assert sum(".mlp.gate.lora_" in n for n in names) == 4  # A and B in each of the 2 layers
    # nested ParamWrappers (one per parameter): ...experts.lora_*, ...experts.base_layer.lora_*
    assert sum(".mlp.experts." in n and "lora_" in n for n in names) == 8  # 2 params x A, B x 2 layers
    assert sum(".self_attn.q_proj.lora_" in n for n in names) == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "moegrad_router" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x = ids()
    for step in range(3):
        out = model(input_ids=x, labels=x)
        assert math.isfinite(float(out.loss.detach()))
        # outputs.loss = the task loss + moegrad's balance loss (its aux_loss)
        assert float(out.aux_loss.detach()) > 0
        torch.testing.assert_close(out.loss - out.aux_loss, task_loss(out.logits, x), atol=1e-5, rtol=0)
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                if ".mlp.gate.lora_" in n:
                    assert p.grad is not None and float(p.grad.abs().sum()) > 0, n
        opt.step()
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, before[n]), f"adapter {n} did not change"
        elif is_base(n):
            assert torch.equal(p, before[n]), f"base weight {n} changed"
        else:  # moegrad's own estimator parameter (noisy_topk's w_noise): peft freezes it only
            # when it exists at get_peft_model (patch first)
            assert p.requires_grad == (order == "peft_then_patch"), n


def gate_lora_grads_two_ways(order, estimator, losses, seed):
    """One forward/backward with labels of (a) the peft model (LoRA on the gate only) and (b)
    the same patched model without peft whose gate weight is the plain tensor W + s B A (A, B
    autograd leaves, copied from (a)); the same RNG state before each (sampling estimators).
    -> (outputs a, outputs b, [(dL/dA, dL/dB) of a, (dL/dA, dL/dB) of b] per layer)."""
    kw = dict(estimator=estimator, losses=losses, allow_forward_change=True)
    model = adapted(order, experts=False, attention=False, **kw)
    x = ids(seed)
    torch.manual_seed(seed)
    out = model(input_ids=x, labels=x)
    if out.loss.requires_grad:  # not when no trainable parameter reaches the loss (unweighted)
        out.loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 4

    ref = tiny("qwen3_moe").train()
    leaves = []
    for i, layer in enumerate(ref.model.layers):
        gate = layer.mlp.gate
        prefix = f"base_model.model.model.layers.{i}.mlp.gate.lora_"
        pa, pb = lora[prefix + "A.default.weight"], lora[prefix + "B.default.weight"]
        a = pa.detach().clone().requires_grad_(True)  # [r, D]
        b = pb.detach().clone().requires_grad_(True)  # [E, r]
        w = gate.weight.detach()
        del gate.weight
        gate.weight = w + (ALPHA / R) * b @ a  # a plain tensor: W + s B A
        leaves.append((pa, pb, a, b))
    mh.patch(ref, **kw)
    torch.manual_seed(seed)
    out_ref = ref(input_ids=x, labels=x)
    if out_ref.loss.requires_grad:
        out_ref.loss.backward()
    return out, out_ref, [((pa.grad, pb.grad), (a.grad, b.grad)) for pa, pb, a, b in leaves]


@pytest.mark.parametrize("estimator", me.available())
def test_gate_lora_gradient_from_the_task_loss(estimator):
    """Experts frozen, no balance loss: the gate LoRA's gradient is the task loss's through
    the estimator alone, equal to plain autograd through W + s B A; nonzero (the router learns)
    for every estimator but ``unweighted`` (unit weights: no router task gradient, a control)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*this training forward with labels adds no balance loss")
        out, out_ref, grads = gate_lora_grads_two_ways("patch_then_peft", estimator, None, 3)
    assert out.aux_loss is None
    torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-6, rtol=0)
    if estimator == "unweighted":  # the loss does not depend on A, B at all
        assert not out.loss.requires_grad  # (the reference model's base weights do train)
        assert all(g is None for pair in grads for g in pair[0] + pair[1])
        return
    total = 0.0
    for (ga, gb), (ra, rb) in grads:
        torch.testing.assert_close(ga, ra, atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(gb, rb, atol=1e-7, rtol=1e-4)
        total += float(ga.abs().sum() + gb.abs().sum())
    assert total > 0


@pytest.mark.parametrize("order", ORDERS)
def test_dense_gate_lora_gradient_matches_plain_autograd(order):
    """With moegrad's balance loss in outputs.loss, in both orders (dense)."""
    out, out_ref, grads = gate_lora_grads_two_ways(order, "dense", {"switch": 1e-2}, 4)
    assert float(out.aux_loss.detach()) > 0
    torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-5, rtol=0)
    for (ga, gb), (ra, rb) in grads:
        assert float(ra.abs().sum()) > 0 and float(rb.abs().sum()) > 0
        torch.testing.assert_close(ga, ra, atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(gb, rb, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("impl", [None, "hf"])
@pytest.mark.parametrize("order", ORDERS)
def test_patched_logits_equal_peft_logits_and_unpatch(order, impl):
    """topk keeps the forward: the patched peft model (LoRA on attention, gate and experts)
    gives the unpatched peft model's logits (so moegrad applies the gate and expert LoRA as
    peft's forward does); unpatch restores the unpatched forward."""
    ref_model = tiny("qwen3_moe")
    torch.manual_seed(1)  # the adapters adapted() draws
    ref_model = peft.get_peft_model(ref_model, lora_config()).eval()
    x = ids(5)
    with torch.no_grad():
        ref = ref_model(input_ids=x).logits
        with ref_model.disable_adapter():
            base = ref_model(input_ids=x).logits
    assert (ref - base).abs().max() > 1e-3  # the adapters change the output
    model = adapted(order, impl=impl, estimator="topk").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref, atol=1e-5, rtol=0)
        with model.disable_adapter():  # adapters off: the base model's logits
            torch.testing.assert_close(model(input_ids=x).logits, base, atol=1e-5, rtol=0)
        mh.unpatch(model)
        assert not mh.routers(model)
        torch.testing.assert_close(model(input_ids=x).logits, ref, atol=1e-5, rtol=0)


def test_merge_and_unload_of_a_patched_model():
    """merge_and_unload folds W + s B A into the base weights; the still-patched model gives
    the adapted logits, holds the HF state_dict keys, and unpatches."""
    model = adapted("patch_then_peft", estimator="dense")
    model.eval()
    x = ids(6)
    with torch.no_grad():
        ref = model(input_ids=x).logits
    merged = model.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert set(merged.state_dict()) == set(tiny("qwen3_moe").state_dict())
    assert len(mh.routers(merged)) == 2
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, ref, atol=1e-5, rtol=0)
        mh.unpatch(merged)
        torch.testing.assert_close(merged(input_ids=x).logits, ref, atol=1e-5, rtol=0)


class _ForwardOnlyWrapper(torch.nn.Module):
    """A wrapper adapting only its forward (no parameter it could apply to moegrad's compute)."""

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer = base_layer

    def forward(self, *args, **kwargs):
        return self.base_layer(*args, **kwargs)


def test_experts_under_a_forward_only_wrapper_raise():
    model = mh.patch(tiny("qwen3_moe"), "topk")
    block = model.model.layers[0].mlp
    block.experts = _ForwardOnlyWrapper(block.experts)
    with pytest.raises(TypeError, match="_ForwardOnlyWrapper.*target_parameters"):
        model(input_ids=ids())


@pytest.mark.parametrize("order", ORDERS)
def test_a_router_whose_gate_trains_only_through_lora_says_it_trains(order):
    """The balance-loss guard of moegrad.hf (losses that lost their gradient under reentrant
    checkpointing) asks whether the gate trains: with a frozen base weight and a LoRA on it, yes."""
    model = adapted(order, experts=False, attention=False)
    router = mh.routers(model)[0]
    assert not router.gate.weight.requires_grad and router.gate_trains
    for p in model.parameters():
        p.requires_grad_(False)
    assert not router.gate_trains
