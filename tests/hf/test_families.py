"""moegrad.hf families: each family's own routing rule, jitter and sampling, reproduced.

Tiny random configs, no network.
Shapes: B batch, S sequence, T tokens, D hidden, E experts, K top-k.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moegrad.hf as mh  # noqa: E402
from tests.hf.models import FAMILIES, ids, maxabs, tiny  # noqa: E402


def test_families_cover_moegrad_hf():
    assert sorted(FAMILIES) == sorted(mh.FAMILIES)


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
