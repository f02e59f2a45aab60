"""moegrad.hf expert adapters: every expert compute and a non-SiLU activation match HF's.

Tiny random configs, no network.
Shapes: B batch, S sequence, T tokens, D hidden, E experts, K top-k.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moegrad.hf as mh  # noqa: E402
from tests.hf.models import grads, ids, tiny  # noqa: E402


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
