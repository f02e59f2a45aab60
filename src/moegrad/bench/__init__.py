"""``moegrad bench``: timings of :class:`moegrad.MoE` against the FLOP-matched dense ideal.

* :mod:`moegrad.bench.cli`: the command's arguments, runner choice, summary and text table;
* :mod:`moegrad.bench.layer`: the PyTorch cases (this process) and their memory measurements;
* :mod:`moegrad.bench.expert_parallel`: expert parallelism over gloo processes (``--world-size``);
* :mod:`moegrad.bench.mlx`: the same layers on MLX (``--backend mlx``; imported only then, so
  this package works without MLX).
"""

from __future__ import annotations

from moegrad._namespace import lazy_names, public_dir

#: public name -> its module, imported on first use (``moegrad bench --help`` loads no torch)
_EXPORTS = {**dict.fromkeys(("add_arguments", "run", "run_world_sizes", "summarize", "format_table"),
                            "moegrad.bench.cli"),
            **dict.fromkeys(("Case", "build_cases", "run_torch", "peak_bytes", "saved_bytes"),
                            "moegrad.bench.layer")}

__all__ = ["add_arguments", "run", "run_world_sizes", "summarize", "format_table", "Case",
           "build_cases", "run_torch", "peak_bytes", "saved_bytes"]


__getattr__ = lazy_names(__name__, _EXPORTS)


__dir__ = public_dir(__name__, __all__)
