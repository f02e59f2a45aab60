"""moegrad on MLX: the same routers, estimators and balance losses as the PyTorch side.

    import mlx.core as mx
    from moegrad import mlx as mgx
    moe = mgx.MoE(dim=64, hidden_dim=128, num_experts=8, top_k=2, estimator="dense")
    out = moe(x)                    # out.y, out.aux_loss, out.routing, out.stats
    values, indices = mgx.topk(scores, 2)   # like torch.topk: differentiable values
    mgx.from_torch(torch_moe); mgx.to_torch(mlx_moe)

No ``mx.stop_gradient`` is needed in user code: indices carry none, and the router gradient
is the chosen estimator's.

Layout (one file per concept, mirroring the PyTorch package): ``routing`` (Router, Routing),
``selection`` (Selection: top-k and combine weights), ``estimators/``, ``dispatch``,
``experts`` (Experts, ExpertWeights by role), ``layer`` (MoE and ``run_experts``, the forward
sequence after the router), ``losses`` (balance losses of a Routing), ``balancing``
(BiasBalancer, QuantileBalancer), ``lm`` (mlx-lm blocks), ``convert``. Configuration, validation and names shared
with PyTorch are in the framework-free ``moegrad._spec`` / ``moegrad._interfaces``.

This subpackage imports only ``mlx`` and those pure-Python modules; torch is imported inside
from_torch/to_torch only.
"""

from moegrad._namespace import public_dir

from moegrad.mlx import estimators, losses
from moegrad.mlx.convert import from_torch, to_torch
from moegrad.mlx.experts import Experts
from moegrad.mlx.layer import MoE, MoEOutput, MoEStats
from moegrad.mlx.balancing import BiasBalancer, QuantileBalancer
from moegrad.mlx.ops import topk
from moegrad.mlx.routing import Router, RouterConfig, Routing

__all__ = ["MoE", "MoEOutput", "MoEStats", "Router", "RouterConfig", "Routing", "Experts",
           "BiasBalancer", "QuantileBalancer", "estimators", "losses", "topk", "from_torch", "to_torch"]


__dir__ = public_dir(__name__, __all__)
