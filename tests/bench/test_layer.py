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


def test_the_progress_bar_counts_every_case():
    """case_count (the progress bar's total per config) is the number of cases build_cases
    times, for the default options and with HF, compile and estimators left out."""
    import argparse

    from moegrad.bench.cli import add_arguments
    from moegrad.bench.layer import build_cases, case_count

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for argv in ([], ["--no-hf", "--no-compile"], ["--impls", "auto", "--estimators", "topk,dense"],
                 ["--compile-estimators", "default_moe,dense,dense,topk"],
                 ["--compile-estimators", "dense", "--no-compile"]):
        args = parser.parse_args(argv)
        cases = build_cases((8, 8, 4, 2, 16), args)
        names = [c.name for c in cases]
        assert len(cases) == case_count(args) and len(set(names)) == len(names), (names, argv)
