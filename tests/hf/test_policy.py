"""moegrad.hf forward policy: which estimators keep each family's forward, on the logits.

Tiny random configs, no network.
Shapes: B batch, S sequence, T tokens, D hidden, E experts, K top-k.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import moegrad  # noqa: E402
import moegrad.hf as mh  # noqa: E402
from tests.hf.models import FAMILIES, NO_TOP1, ids, maxabs, moe_blocks, tiny, tiny_top1  # noqa: E402


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
