"""moegrad.hf patch / unpatch: outputs, gradients, keys, save/load, modes, bad input, example.

Tiny random configs, no network.
Shapes: B batch, S sequence, T tokens, D hidden, E experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moegrad.hf as mh  # noqa: E402
from tests.hf.models import FAMILIES, OTHER, SAME, grads, ids, moe_blocks, tiny  # noqa: E402


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

    path = Path(__file__).resolve().parents[2] / "examples" / "finetune_hf.py"
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
