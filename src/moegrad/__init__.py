"""moegrad: trainable, fast and measurable top-k expert selection for Mixture-of-Experts.

    import moegrad
    moe = moegrad.MoE(dim=64, hidden_dim=128, num_experts=8, top_k=2, estimator="dense")
    out = moe(x)                     # out.y, out.aux_loss, out.routing, out.stats
    moegrad.estimators.available()   # the estimator catalogue

The PyTorch names below are imported on first use, so ``import moegrad.mlx`` (the MLX backend)
loads only MLX, never torch.
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

#: public name -> the module that defines it (a module name itself for subpackages)
_EXPORTS = {
    "MoE": "moegrad.layer", "MoEOutput": "moegrad.layer", "MoEStats": "moegrad.layer",
    "Router": "moegrad.routing", "RouterConfig": "moegrad.routing", "Routing": "moegrad.routing",
    "Experts": "moegrad.experts", "BiasBalancer": "moegrad.balancing", "BalanceWindow": "moegrad.balancing",
    "QuantileBalancer": "moegrad.balancing",
    "estimators": "moegrad.estimators", "losses": "moegrad.losses",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moegrad' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__ == f"moegrad.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names and the loaded public submodules, not the names this file imports to work."""
    return sorted(set(__all__) | {n for n in globals() if not n.startswith("_") and f"moegrad.{n}" in sys.modules})
