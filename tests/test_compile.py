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


def _run(module, moe, x, train):
    """y, aux loss, stats and (training) every gradient of one fwd(+bwd) of ``module``."""
    moe.train(train)
    moe.zero_grad()
    xx = x.clone().requires_grad_(train)
    out = module(xx)
    got = [out.y.detach(), out.aux_loss.detach(), out.stats.tokens_per_expert, out.stats.dropped]
    if train:
        (out.y.square().sum() + out.aux_loss).backward()
        got += [xx.grad] + [p.grad.clone() for p in moe.parameters()]
    return got


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"estimator": "dense"}, {"capacity_factor": 1.0}],
                         ids=["default", "dense", "capacity"])
def test_compile_graph_breaks_no_warnings_matches_eager(options, tmp_path, monkeypatch):
    """The default layer (and dense, capacity mode) compiles with <= 2 graph breaks per forward
    in training and eval (dropless: none; capacity: the kept pairs are a data-dependent shape,
    one break taken in each frame it is nested in), without a warning, and gives eager's y, aux
    loss, stats, load counts and gradients (to float rounding). E=4, 8 rows per expert."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    moe = moegrad.MoE(16, 32, 4, 2, **options)
    x = torch.randn(16, 16)
    limit = 4 if "capacity_factor" in options else 0
    for train in (True, False):
        torch._dynamo.reset()
        moe.train(train)
        explained = torch._dynamo.explain(moe)(x.clone().requires_grad_(train))
        assert explained.graph_break_count <= limit, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(moe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for train in (True, False):
            moe.router.reset_load_counts()
            expected = _run(moe, moe, x, train)
            counts_eager = moe.router.reset_load_counts()
            got = _run(compiled, moe, x, train)
            torch.testing.assert_close(moe.router.reset_load_counts(), counts_eager, rtol=0, atol=0)
            assert len(got) == len(expected)
            for u, v in zip(got, expected):
                torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    ours = [w for w in caught if "torch/jit" not in str(w.filename) and "jit.script" not in str(w.message)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
