"""torch.compile(moe) runs and matches eager (small shapes; compile time dominates, so slow)."""

from __future__ import annotations

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
