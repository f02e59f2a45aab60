"""moegrad.hf patched forwards: activation checkpointing, pickle and deepcopy.

Tiny random configs, no network.
Shapes: B batch, S sequence, T tokens, D hidden, E experts, K top-k.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moegrad.hf as mh  # noqa: E402
from tests.hf.models import OTHER, grads, ids, maxabs, moe_blocks, tiny  # noqa: E402


def _step(estimator, checkpoint=None, losses=None, **options):
    """One training forward + backward of a tiny Qwen3-MoE patched with ``estimator``;
    ``checkpoint``: None, "reentrant" or "non_reentrant" activation checkpointing."""
    model = tiny("qwen3_moe").train()
    if checkpoint is not None:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": checkpoint == "reentrant"})
    mh.patch(model, estimator, losses=losses, **options)
    x = ids(17)
    torch.manual_seed(3)  # the sampling estimators draw from the global RNG
    out = model(x, labels=x, use_cache=False)
    loss = out.loss  # with losses: the LM loss + moegrad's aux loss (out.aux_loss)
    if losses:
        assert float(out.aux_loss) > 0 and mh.routers(model)[0].aux_loss_in_outputs
    loss.backward()
    return model, loss.detach(), grads(model)


@pytest.mark.parametrize("checkpoint", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("estimator", ["default_moe", "gumbel", "noisy_topk", "dense"])
def test_activation_checkpointing_changes_nothing(estimator, checkpoint):
    """The recomputation in backward repeats the forward's samples (global RNG, restored by
    checkpointing) and skips its side effects: loss, every gradient, load_counts and
    default_moe's EMA equal a step without checkpointing."""
    ref_model, ref_loss, g_ref = _step(estimator)
    model, loss, g = _step(estimator, checkpoint)
    assert len(model.model.layers) == 2 and all(l.gradient_checkpointing for l in model.model.layers)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    assert set(g) == set(g_ref)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5, msg=name)
    for r, r_ref in zip(mh.routers(model), mh.routers(ref_model)):
        assert int(r.load_counts.sum()) == ids(17).numel() * 2  # counted once, not twice
        assert torch.equal(r.load_counts, r_ref.load_counts)
        assert torch.equal(r.last_routing.indices, r_ref.last_routing.indices)
        if estimator == "default_moe":  # one EMA update, not two
            assert bool(r.estimator.seen.any())
            torch.testing.assert_close(r.estimator.defaults, r_ref.estimator.defaults, atol=0, rtol=0)


def test_activation_checkpointing_with_moegrad_losses():
    """Non-reentrant (transformers' default): the moegrad losses train as without checkpointing.
    Reentrant runs the forward under no_grad: aux_loss refuses the gradient-less losses."""
    losses = {"switch": 0.5, "z_loss": 0.1}
    _, ref_loss, g_ref = _step("default_moe", losses=losses)
    _, loss, g = _step("default_moe", "non_reentrant", losses=losses)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(RuntimeError, match="carry no gradient.*use_reentrant=False"):
        _step("default_moe", "reentrant", losses=losses)


def test_generator_sampling_refused_with_activation_checkpointing():
    """A generator= is not restored by checkpointing: refused at patch time, or in backward
    when checkpointing was enabled after patch."""
    model = tiny("qwen3_moe").train()
    model.activation_checkpointing_enable()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"generator=.*gradient checkpointing enabled.*"
                       r"estimator='gumbel'"):
        mh.patch(model, "gumbel", generator=gen)
    assert not moe_blocks(model)
    mh.patch(model, "gumbel")  # the global RNG is fine (restored by checkpointing)

    model = tiny("qwen3_moe").train()
    mh.patch(model, "noisy_topk", generator=gen)
    x = ids(18)
    model(x, labels=x).loss.backward()  # no checkpointing: fine
    model.activation_checkpointing_enable()
    out = model(x, labels=x, use_cache=False)
    with pytest.raises(RuntimeError, match="estimator='noisy_topk' with generator= cannot run "
                       "under activation checkpointing"):
        out.loss.backward()


@pytest.mark.parametrize("family", ["qwen3_moe", "phimoe", "gpt_oss"])
def test_pickle_of_patched_model(family, tmp_path):
    """pickle (and torch.save, which pickles) of a patched model gives a patched model with the
    same outputs, bound to its own modules; unpatch works on it and gives the HF forward back.
    (Pickled before any ``output_router_logits=True`` call: transformers then installs recording
    hooks that are local functions, which no pickle of an HF model survives, patched or not.)"""
    import pickle

    model = tiny(family)
    x = ids(19)
    plain = model(x).logits
    mh.patch(model, OTHER[family], losses={"switch": 0.5})
    model(x, labels=x)
    copies = [pickle.loads(pickle.dumps(model))]
    torch.save(model, tmp_path / "model.pt")
    copies.append(torch.load(tmp_path / "model.pt", weights_only=False))
    ref = model(x, labels=x, output_router_logits=True)
    gate = mh.FAMILIES[family].gate
    for clone in copies:
        block = clone.model.layers[0].mlp
        assert block.forward.__self__ is block and block.moegrad_router.gate is getattr(block, gate)
        assert clone.forward.__self__ is clone  # outputs.loss includes the aux loss (checked below)
        assert block.moegrad_router.hf_experts.module is block.experts
        out = clone(x, labels=x, output_router_logits=True)
        torch.testing.assert_close(out.logits, ref.logits, atol=0, rtol=0)
        torch.testing.assert_close(out.loss, ref.loss, atol=0, rtol=0)
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=0, rtol=0)
        assert float(out.aux_loss.detach()) > 0.5 and mh.routers(clone)[0].last_aux_loss is None
        assert len(mh.routers(clone)) == len(mh.routers(model)) == 2
        with torch.no_grad():
            getattr(block, gate).weight.mul_(-1.0)  # the copy's router only
        assert maxabs(clone(x).logits - ref.logits) > 1e-3
        torch.testing.assert_close(model(x).logits, ref.logits, atol=0, rtol=0)
        mh.unpatch(clone)
        assert not mh.routers(clone) and "forward" not in block.__dict__ | clone.__dict__
        with torch.no_grad():
            getattr(block, gate).weight.mul_(-1.0)
        torch.testing.assert_close(clone(x).logits, plain, atol=1e-5, rtol=0)


def test_deepcopy_of_patched_model_is_independent():
    import copy

    model = mh.patch(tiny("qwen3_moe"), "dense")
    x = ids(14)
    clone = copy.deepcopy(model)
    block, twin = model.model.layers[0].mlp, clone.model.layers[0].mlp
    assert twin.forward.__self__ is twin and twin.moegrad_router.gate is twin.gate
    assert clone.forward.__self__ is clone and model.forward.__self__ is model
    assert twin.moegrad_router.hf_experts.module is twin.experts
    with torch.no_grad():
        twin.gate.weight.mul_(-1.0)  # a different router in the copy only
    assert not torch.allclose(clone(x).logits, model(x).logits)
    assert block.moegrad_router.gate is block.gate


@pytest.mark.slow
def test_a_patched_model_compiles_with_no_graph_break_as_in_eager(tmp_path, monkeypatch):
    """torch.compile of a patched model's training forward with labels and moegrad losses (it
    recursed forever between the loss forward and its wrapper before): no graph break, with
    a RoutingMonitor attached too, and eager's loss, every gradient, load counts,
    default_moe's EMA and the monitor's values."""
    from moegrad.diagnostics import RoutingMonitor

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = tiny("qwen3_moe").train()
        mh.patch(model, "default_moe", losses={"switch": 1e-2, "z_loss": 1e-3})
        monitor = RoutingMonitor(model)
        x = ids(17)
        if compiled:
            explained = torch._dynamo.explain(lambda: model(x, labels=x, use_cache=False).loss)()
            assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
            for r in mh.routers(model):
                r.reset_load_counts()
            monitor.reset()
            model.zero_grad()
        forward = torch.compile(model) if compiled else model
        loss = forward(x, labels=x, use_cache=False).loss
        loss.backward()
        routers = mh.routers(model)
        runs.append((loss.detach(), grads(model), [r.load_counts.clone() for r in routers],
                     [r.estimator.defaults.clone() for r in routers], monitor.read()))
    (loss0, g0, c0, d0, m0), (loss1, g1, c1, d1, m1) = runs
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert set(g1) == set(g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(c1 + d1, c0 + d0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert m1.keys() == m0.keys() and any(k.endswith("loss/z_loss") for k in m0)
    for key in m0:
        assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key
