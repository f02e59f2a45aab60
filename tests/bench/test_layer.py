"""The PyTorch benchmark's memory measurements: peak bytes (allocator events) and saved bytes."""

from __future__ import annotations

import torch

from moegrad.bench.layer import peak_bytes, saved_bytes


def test_peak_bytes_sees_transient_buffers():
    def step():
        a = torch.ones(1024, 1024)  # 4 MiB, freed before b is made
        del a
        b = torch.ones(512, 1024)  # 2 MiB
        c = torch.ones(512, 1024)  # 2 MiB more while b lives
        del b, c

    assert peak_bytes(step) == 4 * 2 ** 20


def test_saved_bytes_counts_activations_once():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    # x @ w saves x (128 B; w excluded); sin saves its input h (128 B); h used twice counts once
    def step():
        h = x @ w
        return h.sin() + h.cos()
    assert saved_bytes(step, {w.untyped_storage().data_ptr()}) == 4 * 8 * 4 * 2
