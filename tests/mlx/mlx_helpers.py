"""Helpers for the MLX tests: array conversion and gradients of both frameworks on one loss.

The loss is L = sum(y * R) + aux_loss with a fixed random R, so dL/dy = R.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_flatten


def np_(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().float().numpy()
    return np.array(a.astype(mx.float32) if a.dtype in (mx.bfloat16, mx.float16) else a)


def max_diff(a, b) -> float:
    a, b = np_(a), np_(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


def torch_grads(module, x: torch.Tensor, weight: torch.Tensor, mask=None) -> dict:
    """Output, loss and gradients (input and every parameter, by state-dict name) in PyTorch."""
    x = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x, mask) if mask is not None else module(x)
    y = out.y if hasattr(out, "y") else out.weights
    aux = out.aux_loss if hasattr(out, "aux_loss") else 0.0
    loss = (y * weight).sum() + aux
    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return {"y": y.detach(), "loss": loss.detach(), "x": x.grad, "out": out, **grads}


def mlx_grads(module, x: mx.array, weight: mx.array, mask=None) -> dict:
    """The same for an MLX module; parameter names are the flattened trainable tree's."""
    params = module.trainable_parameters()
    holder = {}

    def loss_fn(p, x_):
        module.update(p)
        out = module(x_, mask) if mask is not None else module(x_)
        holder["out"] = out
        y = out.y if hasattr(out, "y") else out.weights
        aux = out.aux_loss if hasattr(out, "aux_loss") else 0.0
        holder["y"] = y
        return (y * weight).sum() + aux

    loss, (gp, gx) = mx.value_and_grad(loss_fn, argnums=(0, 1))(params, x)
    module.update(params)
    grads = dict(tree_flatten(gp))
    mx.eval(loss, gx, grads)
    return {"y": holder["y"], "loss": loss, "x": gx, "out": holder["out"], **grads}


def to_mx(t: torch.Tensor) -> mx.array:
    return mx.array(t.detach().cpu().numpy())
