"""moegrad on MLX: the same routers, estimators and balance losses as the PyTorch side.

    import mlx.core as mx
    from moegrad import mlx as mgx
    moe = mgx.MoE(dim=64, hidden_dim=128, num_experts=8, top_k=2, estimator="dense")
    out = moe(x)                    # out.y, out.aux_loss, out.routing, out.stats
    values, indices = mgx.topk(scores, 2)   # like torch.topk: differentiable values
    mgx.from_torch(torch_moe); mgx.to_torch(mlx_moe)

No ``mx.stop_gradient`` is needed in user code: indices carry none, and the router gradient
is the chosen estimator's. This subpackage imports only ``mlx`` (and the pure-Python
``moegrad._checks``); torch is imported inside from_torch/to_torch only. (``moegrad/__init__``
itself imports torch today, so ``import moegrad.mlx`` still loads torch through the parent.)
"""

from moegrad.mlx import estimators, losses
from moegrad.mlx.convert import from_torch, to_torch
from moegrad.mlx.experts import Experts
from moegrad.mlx.layer import MoE, MoEOutput, MoEStats
from moegrad.mlx.balancing import BiasBalancer
from moegrad.mlx.ops import topk
from moegrad.mlx.routing import Router, RouterConfig, Routing

__all__ = ["MoE", "MoEOutput", "MoEStats", "Router", "RouterConfig", "Routing", "Experts",
           "BiasBalancer", "estimators", "losses", "topk", "from_torch", "to_torch"]
