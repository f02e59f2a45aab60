"""``moegrad bench``: timings of :class:`moegrad.MoE` against the FLOP-matched dense ideal.

* :mod:`moegrad.bench.cli`: the command's arguments, runner choice, summary and text table;
* :mod:`moegrad.bench.layer`: the PyTorch cases (this process) and their memory measurements;
* :mod:`moegrad.bench.expert_parallel`: expert parallelism over gloo processes (``--world-size``);
* :mod:`moegrad.bench.mlx`: the same layers on MLX (``--backend mlx``; imported only then, so
  this package works without MLX).
"""

from __future__ import annotations

import importlib
import sys

#: public name -> its module, imported on first use (``moegrad bench --help`` loads no torch)
_EXPORTS = {**dict.fromkeys(("add_arguments", "run", "run_world_sizes", "summarize", "format_table"),
                            "moegrad.bench.cli"),
            **dict.fromkeys(("Case", "build_cases", "run_torch", "peak_bytes", "saved_bytes"),
                            "moegrad.bench.layer")}

__all__ = ["add_arguments", "run", "run_world_sizes", "summarize", "format_table", "Case",
           "build_cases", "run_torch", "peak_bytes", "saved_bytes"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moegrad.bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names and the loaded submodules."""
    return sorted(set(__all__) | {n for n in globals() if not n.startswith("_") and f"{__name__}.{n}" in sys.modules})
