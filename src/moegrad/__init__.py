"""moegrad: trainable, fast and measurable top-k expert selection for Mixture-of-Experts.

    import moegrad
    moe = moegrad.MoE(dim=64, hidden_dim=128, num_experts=8, top_k=2, estimator="dense")
    out = moe(x)                     # out.y, out.aux_loss, out.routing, out.stats
    moegrad.estimators.available()   # the estimator catalogue

The PyTorch names below are imported on first use, so ``import moegrad.mlx`` (the MLX backend)
loads only MLX, never torch.
"""

from __future__ import annotations

from moegrad._namespace import lazy_names, public_dir

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


__getattr__ = lazy_names(__name__, _EXPORTS)


__dir__ = public_dir(__name__, __all__)
