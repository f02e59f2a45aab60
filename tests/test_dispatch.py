"""Dispatch plan, gather and weighted combine against per-token loops (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moegrad.dispatch import combine_rows, expert_capacity, gather_rows, plan_dispatch


def _routing(t, k, e, gen=None, distinct=True):
    if distinct:
        idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) if t else \
            torch.zeros(0, k, dtype=torch.int64)
    else:
        idx = torch.randint(0, e, (t, k), generator=gen)
    w = torch.rand(t, k, generator=gen, dtype=torch.float64)
    return idx.view(t, k), w


def _loop_combine(x, idx, w, f, keep=None):
    """y[t] = sum_j w[t, j] f(x[t], idx[t, j]) over kept pairs, token by token."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            if keep is None or keep[t, j]:
                out[t] = out[t] + w[t, j] * f(x[t], int(idx[t, j]))
    return out


def _per_expert_scale(e, d):
    return torch.linspace(0.5, 2.0, e * d, dtype=torch.float64).view(e, d)


def _through_plan(x, idx, w, num_experts, capacity=None):
    """gather -> row-wise expert map (x * a_e) -> combine."""
    plan = plan_dispatch(idx, w, num_experts, capacity)
    rows = gather_rows(x, plan)
    a = _per_expert_scale(num_experts, x.shape[1])
    return combine_rows(rows * a[plan.experts], w, plan, x.shape[0]), plan


def test_plan_sorted_stable_and_inverse():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    plan = plan_dispatch(idx, torch.rand(4, 2), 4)
    assert plan.pairs.tolist() == [1, 2, 6, 3, 5, 0, 4, 7]  # by expert, then pair order
    assert plan.tokens.tolist() == [0, 1, 3, 1, 2, 0, 2, 3]
    assert plan.experts.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert plan.counts.tolist() == [3, 2, 3, 0]
    assert int(plan.dropped) == 0
    assert torch.equal(plan.pairs[plan.slots], torch.arange(8))


@pytest.mark.parametrize("t,k,e", [(9, 2, 5), (1, 1, 1), (6, 4, 4), (7, 3, 8), (0, 2, 3)])
def test_gather_combine_match_loop_with_gradients(t, k, e):
    gen = torch.Generator().manual_seed(t * 100 + k * 10 + e)
    idx, w = _routing(t, k, e, gen)
    x = torch.randn(t, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w.requires_grad_()
    y, plan = _through_plan(x, idx, w, e)
    a = _per_expert_scale(e, 3)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = _loop_combine(x2, idx, w2, lambda v, i: v * a[i])
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-14)
    if t:
        g = torch.randn(t, 3, dtype=torch.float64, generator=gen)
        (y * g).sum().backward()
        (ref * g).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-13)
        torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=1e-13)
    assert plan.counts.sum() == t * k


def test_gradcheck_gather_and_combine():
    gen = torch.Generator().manual_seed(1)
    idx, w = _routing(5, 2, 4, gen)
    for capacity in (None, 2):
        plan = plan_dispatch(idx, w, 4, capacity)
        x = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
        ww = w.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b: combine_rows(gather_rows(a, plan) ** 2, b, plan, 5),
                                        (x, ww))


def test_capacity_keeps_highest_weights_and_counts_drops_exactly():
    gen = torch.Generator().manual_seed(3)
    t, k, e = 40, 2, 4
    idx = torch.randint(0, 2, (t, 1), generator=gen)  # experts 0/1 crowded, 2/3 light
    idx = torch.cat([idx, idx.new_full((t, 1), 2) + (torch.arange(t)[:, None] % 2)], 1)
    w = torch.rand(t, k, generator=gen, dtype=torch.float64)
    cap = expert_capacity(1.0, t, k, e)
    assert cap == 20
    plan = plan_dispatch(idx, w, e, cap)
    routed = torch.bincount(idx.view(-1), minlength=e)
    assert torch.equal(plan.routed, routed)
    assert int(plan.dropped) == int((routed - cap).clamp(min=0).sum())
    assert plan.counts.tolist() == routed.clamp(max=cap).tolist()
    keep = plan.slots.view(t, k) >= 0
    for ex in range(e):
        mine = idx == ex
        kept_w, drop_w = w[mine & keep], w[mine & ~keep]
        if drop_w.numel():
            assert kept_w.min() >= drop_w.max()
    # dropped pairs contribute zero; gradients match the loop over kept pairs
    x = torch.randn(t, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    wr = w.clone().requires_grad_()
    y, _ = _through_plan(x, idx, wr, e, cap)
    a = _per_expert_scale(e, 3)
    x2, w2 = x.detach().clone().requires_grad_(), w.clone().requires_grad_()
    ref = _loop_combine(x2, idx, w2, lambda v, i: v * a[i], keep)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-14)
    y.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-13)
    torch.testing.assert_close(wr.grad, w2.grad, rtol=0, atol=1e-13)
    assert float(wr.grad[~keep].abs().max()) == 0.0


def test_capacity_limits():
    gen = torch.Generator().manual_seed(4)
    idx, w = _routing(10, 2, 4, gen)
    big = plan_dispatch(idx, w, 4, capacity=20)
    free = plan_dispatch(idx, w, 4)
    assert torch.equal(big.pairs, free.pairs) and int(big.dropped) == 0
    none = plan_dispatch(idx, w, 4, capacity=0)
    assert int(none.dropped) == 20 and none.pairs.numel() == 0
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    y = combine_rows(gather_rows(x, none), w, none, 10)
    assert float(y.detach().abs().max()) == 0.0 and y.shape == (10, 3)


def test_deterministic_run_to_run():
    gen = torch.Generator().manual_seed(5)
    idx, w = _routing(300, 4, 16, gen, distinct=False)
    x = torch.randn(300, 64, generator=gen)
    results = []
    for _ in range(2):
        xx, ww = x.clone().requires_grad_(), w.float().clone().requires_grad_()
        plan = plan_dispatch(idx, ww, 16)
        y = combine_rows(gather_rows(xx, plan).sin(), ww, plan, 300)
        y.square().sum().backward()
        results.append((y.detach(), xx.grad, ww.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="indices must lie in 0..3"):
        plan_dispatch(torch.tensor([[4]]), torch.ones(1, 1), 4)
    with pytest.raises(ValueError, match="weights must match"):
        plan_dispatch(torch.tensor([[1]]), torch.ones(2, 1), 4)
    with pytest.raises(ValueError, match="capacity=-1"):
        plan_dispatch(torch.tensor([[1]]), torch.ones(1, 1), 4, capacity=-1)
    with pytest.raises(ValueError, match="int64"):
        plan_dispatch(torch.tensor([1.0]), torch.ones(1), 4)


@settings(max_examples=40, deadline=None)
@given(t=st.integers(0, 12), k=st.integers(1, 4), e=st.integers(1, 6),
       cap=st.one_of(st.none(), st.integers(0, 8)), seed=st.integers(0, 2 ** 16))
def test_property_dispatch_combine_equals_loop_and_counts_every_pair(t, k, e, cap, seed):
    gen = torch.Generator().manual_seed(seed)
    idx, w = _routing(t, k, e, gen, distinct=False)
    x = torch.randn(t, 2, dtype=torch.float64, generator=gen)
    y, plan = _through_plan(x, idx, w, e, cap)
    keep = plan.slots.view(t, k) >= 0
    # every (token, slot) pair is routed once and either kept (once) or dropped
    assert int(plan.routed.sum()) == t * k
    assert int(plan.counts.sum()) + int(plan.dropped) == t * k
    assert int(keep.sum()) == plan.pairs.numel() == int(plan.counts.sum())
    assert sorted(plan.pairs.tolist()) == sorted(torch.nonzero(keep.view(-1)).view(-1).tolist())
    if cap is not None:
        routed = torch.bincount(idx.view(-1), minlength=e)
        assert int(plan.dropped) == int((routed - cap).clamp(min=0).sum())
    else:
        assert bool(keep.all())
    a = _per_expert_scale(e, 2)
    ref = _loop_combine(x, idx, w, lambda v, i: v * a[i], keep)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-13)
    assert math.isclose(float(plan.dropped), t * k - plan.pairs.numel())
