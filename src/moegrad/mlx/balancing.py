"""Auxiliary-loss-free balancing in MLX (DeepSeek-V3; the twin of :mod:`moegrad.balancing`).

Shapes: E experts. Each :class:`~moegrad.mlx.Router` built with ``selection_bias=True`` holds a
bias b [E] fp32 that is added to the scores for the selection only, and ``load_counts`` [E], the
(token, slot) pairs routed to each expert in training mode since the last reset. Between
optimizer steps :class:`BiasBalancer` moves the bias toward balance:

    b_i += gamma * sign(mean_j load_j - load_i)

The balance losses (pure functions of one call's Routing) are :mod:`moegrad.mlx.losses`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from moegrad._spec import balanced_routers
from moegrad.mlx.routing import Router


class BiasBalancer:
    """Auxiliary-loss-free balancing (DeepSeek-V3): b_i += gamma * sign(mean_load - load_i).

    ``module``: a Router, an MoE or a whole model; every :class:`~moegrad.mlx.Router` in it built
    with ``selection_bias=True`` is balanced from its ``load_counts``. Call :meth:`step` after
    the optimizer update. The bias and its updates are fp32 whatever the model's dtype: the
    Router keeps ``bias`` fp32 through ``model.set_dtype(mx.bfloat16)`` (in bf16, +1e-3 on 0.5
    would round away while -1e-3 applies).
    """

    def __init__(self, module: nn.Module, gamma: float = 1e-3) -> None:
        self.gamma, self.routers = balanced_routers(module, gamma, nn.Module, lambda m: isinstance(m, Router),
                                                    "mlx.nn.Module", "moegrad.mlx")

    def step(self) -> list:
        """Update every bias from its counts, reset the counts; returns the loads used."""
        loads = []
        for router in self.routers:
            load = router.reset_load_counts().astype(mx.float32)
            if float(load.sum()) > 0:
                router.bias = router.bias + self.gamma * mx.sign(load.mean() - load)
            loads.append(load)
        return loads
