"""moegrad.hf router view: the Router contract, the selection bias, the router gradients.

Tiny random configs, no network.
Shapes: B batch, S sequence, T tokens, D hidden, E experts, K top-k.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import moegrad  # noqa: E402
import moegrad.hf as mh  # noqa: E402
from tests.hf.models import NO_TOP1, TOP1, ids, maxabs, router_weight_grads, tiny, tiny_top1  # noqa: E402


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_repr_of_a_patched_model_names_the_router_view(family):
    """print(model) of a patched model shows each block's router view (family, config, impl)."""
    model = tiny(family)
    mh.patch(model, estimator="dense")
    text = repr(model)
    assert "(moegrad_router): HFRouter(" in text and mh.routers(model)
    assert f"family={family}, dim=32, num_experts=" in text and "estimator=dense" in text


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
