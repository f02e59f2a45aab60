"""``moegrad bench``: timings of :class:`moegrad.MoE` against the FLOP-matched dense ideal.

* :mod:`moegrad.bench.cli`: the command's arguments, runner choice, summary and text table;
* :mod:`moegrad.bench.layer`: the PyTorch cases (this process) and their memory measurements;
* :mod:`moegrad.bench.expert_parallel`: expert parallelism over gloo processes (``--world-size``);
* :mod:`moegrad.bench.mlx`: the same layers on MLX (``--backend mlx``; imported only then, so
  this package works without MLX).
"""

from __future__ import annotations

from moegrad.bench.cli import add_arguments, format_table, run, run_world_sizes, summarize
from moegrad.bench.layer import Case, build_cases, peak_bytes, run_torch, saved_bytes

__all__ = ["add_arguments", "run", "run_world_sizes", "summarize", "format_table", "Case",
           "build_cases", "run_torch", "peak_bytes", "saved_bytes"]
