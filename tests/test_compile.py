"""torch.compile(moe) runs and matches eager (small shapes; compile time dominates, so slow)."""

from __future__ import annotations

import warnings

import pytest
import torch

import moegrad


@pytest.mark.slow
def test_compiled_moe_matches_eager(tmp_path, monkeypatch):
    """One case keeps the compile time bounded (~30-40 s on 2 cores): capacity mode on, and 48
    rows per expert so ``auto`` takes the grouped_mm backend (fp32). A private inductor cache:
    a stale one left on the machine by an older checkout can fail torch's cache lookup."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = moegrad.MoE(16, 32, 4, 2, impl="auto", capacity_factor=1.0)
    x = torch.randn(96, 16)
    from moegrad.experts import choose_impl
    assert choose_impl(96 * 2, 4, 60, torch.float32, True) == "grouped_mm"  # 48 rows per expert
    compiled = torch.compile(moe)
    outs = []
    for module in (moe, compiled):
        moe.zero_grad()
        xx = x.clone().requires_grad_()
        out = module(xx)
        (out.y.square().sum() + out.aux_loss).backward()
        outs.append((out.y.detach(), out.aux_loss.detach(), out.stats.dropped, xx.grad,
                     [p.grad.clone() for p in moe.parameters()]))
    (y0, a0, d0, gx0, gp0), (y1, a1, d1, gx1, gp1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a1, a0, rtol=1e-5, atol=1e-7)
    assert int(d1) == int(d0)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    for u, v in zip(gp1, gp0):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def _run(module, moe, x, train, mask=None, state=None):
    """y, aux loss, stats, every buffer after the call and (training) every gradient of one
    fwd(+bwd) of ``module``, starting from ``state`` (a state_dict: the same load counts,
    ReMoE lambda, ...)."""
    if state is not None:
        moe.load_state_dict(state)
    moe.train(train)
    moe.zero_grad()
    xx = x.clone().requires_grad_(train)
    out = module(xx, mask)
    stats = out.stats
    got = [out.y.detach(), out.aux_loss.detach(), stats.tokens_per_expert, stats.dropped]
    got += [stats.unrouted_tokens] if stats.unrouted_tokens is not None else []
    got += [b.clone() for b in moe.buffers()]
    if train:
        (out.y.square().sum() + out.aux_loss).backward()
        got += [xx.grad] + [p.grad.clone() for p in moe.parameters()]
    return got


def _mask(tokens):
    """[T] bool, the last 5 tokens padding."""
    mask = torch.ones(tokens, dtype=torch.bool)
    mask[-5:] = False
    return mask


CASES = {  # name: (layer options, with a padding mask)
    "default": ({}, False),
    "dense": ({"estimator": "dense"}, False),
    "default_moe": ({"estimator": "default_moe"}, False),
    "capacity": ({"capacity_factor": 1.0}, False),
    "capacity_mask": ({"capacity_factor": 1.0, "losses": {"switch": 1e-2, "z_loss": 1e-3}}, True),
    "sinkhorn": ({"routing": "sinkhorn"}, False),
    "expert_choice_mask": ({"routing": "expert_choice"}, True),
    "remoe_mask": ({"routing": "remoe", "l1_init": 0.5}, True),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_compile_graph_breaks_no_warnings_matches_eager(name, tmp_path, monkeypatch):
    """These layers compile with no graph break per forward in training and eval (issue 15
    asks for <= 2; under torch.compile capacity, masks, expert choice and ReMoE dispatch
    through a static-shape padded plan, Sinkhorn and the running-state updates through custom
    ops, default_moe's EMA through one), without a warning, and give eager's y, aux loss, stats,
    buffers (load counts, ReMoE's lambda, default_moe's defaults, which eager's training call
    moves: so the compiled update ran, once) and gradients
    (to float rounding). E=4, T=16."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    options, with_mask = CASES[name]
    torch.manual_seed(0)
    moe = moegrad.MoE(16, 32, 4, 2, **options)
    x = torch.randn(16, 16)
    mask = _mask(16) if with_mask else None
    state = {k: v.clone() for k, v in moe.state_dict().items()}
    for train in (True, False):
        torch._dynamo.reset()
        moe.train(train)
        explained = torch._dynamo.explain(moe)(x.clone().requires_grad_(train), mask)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(moe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for train in (True, False):
            expected = _run(moe, moe, x, train, mask, state)
            got = _run(compiled, moe, x, train, mask, state)
            assert len(got) == len(expected)
            for u, v in zip(got, expected):
                torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    ours = [w for w in caught if "torch/jit" not in str(w.filename) and "jit.script" not in str(w.message)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]


@pytest.mark.parametrize("capacity", [None, 2, "tensor"])
def test_padded_plan_keeps_the_eager_rows(capacity):
    """plan_dispatch(padded=True) (the static-shape plan torch.compile runs) has the eager
    plan's rows first, in the same order, with the same counts and slots, then padding rows;
    grouped_mlp(padded=True) gives the eager rows' outputs, zero padding rows, and the same
    gradients. Capacity as an int and as a 0-d tensor, with a padding mask."""
    from moegrad.dispatch import plan_dispatch
    from moegrad.experts import grouped_mlp

    torch.manual_seed(0)
    t, k, e = 12, 2, 4
    indices = torch.randn(t, e).topk(k, dim=-1).indices
    weights = torch.rand(t, k)
    keep = _mask(t)
    cap = torch.tensor(2) if capacity == "tensor" else capacity
    eager = plan_dispatch(indices, weights, e, 2 if capacity == "tensor" else capacity, keep=keep)
    padded = plan_dispatch(indices, weights, e, cap, keep=keep, padded=True, max_rows=t * k - 2)
    m = eager.pairs.shape[0]
    assert padded.pairs.shape[0] == t * k - 2 and not padded.dropless and m < t * k - 2
    assert torch.equal(padded.pairs[:m], eager.pairs) and torch.equal(padded.tokens[:m], eager.tokens)
    for a in ("counts", "routed", "dropped", "slots"):
        assert torch.equal(getattr(padded, a), getattr(eager, a)), a
    assert int(padded.counts.sum()) == m
    w1, w3 = torch.randn(e, 8, 6, requires_grad=True), torch.randn(e, 8, 6, requires_grad=True)
    w2 = torch.randn(e, 6, 8, requires_grad=True)
    rows = torch.randn(t * k - 2, 6, requires_grad=True)
    out = grouped_mlp(rows, padded.counts, w1, w2, w3, padded=True)
    ref = grouped_mlp(rows[:m], eager.counts, w1, w2, w3)
    assert torch.equal(out[:m], ref) and not out[m:].any()
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (rows, w1, w2, w3), g)
    want = torch.autograd.grad(ref, (rows, w1, w2, w3), g[:m])
    assert not got[0][m:].any()
    for u, v in zip(got, want):  # rows[:m] is a view: want[0] is [R, D] with zero padding rows
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="padded: counts"):
        grouped_mlp(rows[: m - 1], padded.counts, w1, w2, w3, padded=True)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["gumbel", "noisy_topk", "sparsemixer"])
def test_sampling_estimators_compile_to_eager_given_eagers_random_numbers(estimator, tmp_path, monkeypatch):
    """Sampling estimators compile with no graph break. Inductor draws its own random numbers
    (another stream than eager's for the same seed), so a compiled training step samples
    other noise; with ``fallback_random=True`` (eager's RNG calls inside the compiled code) it
    gives eager's y and every gradient: the graph computes the same function of the noise."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = moegrad.MoE(16, 32, 4, 2, estimator=estimator).train()
    x = torch.randn(16, 16)
    explained = torch._dynamo.explain(moe)(x.clone().requires_grad_())
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()
    state = {k: v.clone() for k, v in moe.state_dict().items()}
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(moe)
        runs = []
        for module in (moe, compiled):
            torch.manual_seed(1)
            runs.append(_run(module, moe, x, True, None, state))
    for u, v in zip(*runs):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("forward_defaults", [False, True])
def test_compiled_default_moe_under_checkpointing_observes_once(forward_defaults, tmp_path, monkeypatch):
    """default_moe's EMA is traced into the compiled graph (custom op moegrad::update_defaults);
    activation checkpointing re-runs that graph in backward, where the run-time test makes it
    observe nothing. Two steps (the second reads the EMA the first wrote) of
    checkpoint(torch.compile(moe)) equal eager without checkpointing: y, every gradient,
    defaults, seen, load counts."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    x = torch.randn(16, 16)
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        moe = moegrad.MoE(16, 32, 4, 2, estimator="default_moe", forward_defaults=forward_defaults).train()
        module = torch.compile(moe) if compiled else moe
        for step in range(2):
            moe.zero_grad()
            xx = (x + step).requires_grad_()
            if compiled:
                y = checkpoint(lambda v: module(v).y, xx, use_reentrant=False)
            else:
                y = module(xx).y
            y.square().sum().backward()
        est = moe.router.estimator
        runs.append([y.detach(), xx.grad, est.defaults.clone(), est.seen.clone(), est.skipped.clone(),
                     moe.router.load_counts.clone()] + [p.grad.clone() for p in moe.parameters()])
    assert runs[0][3].all()  # every expert observed: the EMA moved
    for u, v in zip(*runs):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def test_run_time_recomputation_ops():
    """The custom op that tests for checkpointing's recomputation at run time (so compiled
    graphs need no break), and update_running_state built on it: outside a backward pass
    unless_recomputing copies and update_running_state adds/multiplies; inside one (where the
    recomputation runs) the first gives the neutral value and the second changes nothing."""
    from moegrad.routing import update_running_state, unless_recomputing

    t = torch.tensor([3, 0, 2])
    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen["neutral"] = unless_recomputing(t, 0.0)
            seen["one"] = unless_recomputing(torch.tensor([2.0]), 1.0)
            state = torch.tensor([1.0, 2.0])
            update_running_state(state, torch.tensor([3.0, 3.0]), "mul")
            seen["state"] = state
            return g

    assert torch.equal(unless_recomputing(t, 0.0), t)
    state = torch.tensor([1.0, 2.0])
    update_running_state(state, torch.tensor([3.0, 3.0]), "mul")
    update_running_state(state, torch.tensor([1.0, 1.0]), "add")
    assert state.tolist() == [4.0, 7.0]
    Probe.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert seen["neutral"].tolist() == [0, 0, 0] and seen["one"].tolist() == [1.0]
    assert seen["state"].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="how='div'"):
        update_running_state(state, state, "div")


def test_a_users_experts_subclass_keeps_its_forward_under_compile():
    """The static-shape plan calls moegrad's own Experts.forward with padded=; a subclass whose
    forward(rows, counts) has no such argument gets the exact-size rows, as in eager."""
    torch._dynamo.reset()

    class MyExperts(moegrad.Experts):
        def forward(self, rows, counts):
            return super().forward(rows, counts) * 2.0

    torch.manual_seed(0)
    moe = moegrad.MoE(16, 24, 8, 2, capacity_factor=0.75, losses={})
    mine = MyExperts(16, 24, 8)
    mine.load_state_dict(moe.experts.state_dict())
    moe.experts = mine
    x = torch.randn(20, 16)
    mask = torch.arange(20) % 5 != 0
    eager = moe(x, mask).y
    compiled = torch.compile(moe, backend="aot_eager")(x, mask).y
    torch.testing.assert_close(compiled, eager)
