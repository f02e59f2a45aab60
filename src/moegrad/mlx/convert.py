"""Convert moegrad modules between PyTorch and MLX, weights and state included.

``from_torch(module)`` takes a :class:`moegrad.MoE` or :class:`moegrad.Router` and returns its
:mod:`moegrad.mlx` twin; ``to_torch(module)`` goes back. Carried over: the configuration, the
estimator and its options, the training/eval mode, the gate, the stacked expert weights
(:class:`~moegrad._interfaces.ExpertWeights` gate w1 [E, H, D], up w3 [E, H, D], down w2
[E, D, H], under the same names on both sides), the selection bias, ``load_counts``, ``noisy_topk``'s
``w_noise`` and ``default_moe``'s ``defaults``/``seen``. Dtypes are kept (bfloat16 goes
through float32 on the way). A torch ``generator`` option has no MLX equivalent and becomes
``seed=None`` (and back); ``impl`` is PyTorch-only and takes its default on the way back.

torch is imported inside these functions only.
"""

from __future__ import annotations

import mlx.core as mx

from moegrad.mlx.experts import WEIGHT_NAMES
from moegrad.mlx.layer import MoE
from moegrad.mlx.routing import Router

_ROUTER_FIELDS = ("routing", "score", "normalize", "temperature", "routed_scaling_factor", "n_group",
                  "topk_group", "selection_bias", "check_finite", "l1_init", "l1_alpha")
_MX_DTYPES = {"torch.float32": mx.float32, "torch.float16": mx.float16,
              "torch.bfloat16": mx.bfloat16, "torch.float64": mx.float32,
              "torch.int64": mx.int64, "torch.bool": mx.bool_}


def _to_mx(t) -> mx.array:
    import torch

    t = t.detach().cpu()
    dtype = _MX_DTYPES.get(str(t.dtype))
    if dtype is None:
        raise TypeError(f"cannot convert a torch tensor of dtype {t.dtype} to MLX")
    if t.dtype in (torch.bfloat16, torch.float16):
        return mx.array(t.float().numpy()).astype(dtype)
    return mx.array(t.numpy()).astype(dtype)


def _to_torch(a: mx.array, like):
    """MLX array -> torch tensor with the dtype and device of ``like``."""
    import numpy as np
    import torch

    if a.dtype in (mx.bfloat16, mx.float16):
        a = a.astype(mx.float32)
    return torch.from_numpy(np.array(a)).to(dtype=like.dtype, device=like.device)


def _options(estimator, drop: str, add: str) -> dict:
    opts = {k: getattr(estimator, k) for k in type(estimator).options if k != drop}
    if drop in type(estimator).options:
        opts[add] = None
    return opts


def _router_kwargs(config, estimator) -> dict:
    """The router's settings and its estimator's name (None under ``routing="remoe"``, which
    takes none) as keyword arguments of the other framework's constructor."""
    kwargs = {name: getattr(config, name) for name in _ROUTER_FIELDS}
    kwargs["estimator"] = None if config.routing == "remoe" else estimator.name
    return kwargs


def _copy_router_from_torch(src, dst: Router) -> None:
    dst.gate.weight = _to_mx(src.gate.weight)
    if src.bias is not None:
        dst.bias = _to_mx(src.bias)
    dst.load_counts = _to_mx(src.load_counts)
    if src.config.routing == "remoe":
        dst.l1_coefficient = _to_mx(src.l1_coefficient)
    est = src.estimator
    if hasattr(est, "w_noise"):
        dst.estimator.w_noise = _to_mx(est.w_noise)
    if hasattr(est, "defaults"):
        dst.estimator.defaults = _to_mx(est.defaults)
        dst.estimator.seen = _to_mx(est.seen)


def from_torch(module):
    """A :class:`moegrad.MoE` or :class:`moegrad.Router` -> its :mod:`moegrad.mlx` twin."""
    import moegrad

    if isinstance(module, moegrad.MoE):
        r = module.router
        opts = _options(r.estimator, drop="generator", add="seed")
        ex = module.experts
        out = MoE(r.config.dim, ex.hidden_dim, r.config.num_experts, r.config.top_k,
                  activation=ex.activation, losses=dict(module.losses),
                  capacity_factor=module.capacity_factor, **_router_kwargs(r.config, r.estimator), **opts)
        _copy_router_from_torch(r, out.router)
        for name in WEIGHT_NAMES.values():  # w3 is None for GELU experts
            if getattr(ex, name) is not None:
                setattr(out.experts, name, _to_mx(getattr(ex, name)))
    elif isinstance(module, moegrad.Router):
        opts = _options(module.estimator, drop="generator", add="seed")
        c = module.config
        out = Router(c.dim, c.num_experts, c.top_k,
                     capacity_factor=c.capacity_factor, **_router_kwargs(c, module.estimator), **opts)
        _copy_router_from_torch(module, out)
    else:
        raise TypeError(f"from_torch expects a moegrad.MoE or moegrad.Router, got {type(module).__name__}")
    out.train(module.training)
    return out


def _copy_router_to_torch(src: Router, dst) -> None:
    import torch

    with torch.no_grad():
        dst.gate.weight.copy_(_to_torch(src.gate.weight, dst.gate.weight))
        if dst.bias is not None:
            dst.bias.copy_(_to_torch(src.bias, dst.bias))
        dst.load_counts.copy_(_to_torch(src.load_counts, dst.load_counts))
        if src.config.routing == "remoe":
            dst.l1_coefficient.copy_(_to_torch(src.l1_coefficient, dst.l1_coefficient))
        est = dst.estimator
        if hasattr(est, "w_noise"):
            est.w_noise.copy_(_to_torch(src.estimator.w_noise, est.w_noise))
        if hasattr(est, "defaults"):
            est.defaults.copy_(_to_torch(src.estimator.defaults, est.defaults))
            est.seen.copy_(_to_torch(src.estimator.seen, est.seen))


def _restore_low_precision(torch_module, mx_dtype) -> None:
    """Cast ``torch_module`` to bf16/fp16 when its MLX source had that dtype (the copy went
    through float32)."""
    import torch

    low = {mx.bfloat16: torch.bfloat16, mx.float16: torch.float16}
    if mx_dtype in low:
        torch_module.to(low[mx_dtype])


def to_torch(module):
    """A :class:`moegrad.mlx.MoE` or :class:`moegrad.mlx.Router` -> its PyTorch twin (CPU)."""
    import torch

    import moegrad

    if isinstance(module, MoE):
        r = module.router
        opts = _options(r.estimator, drop="seed", add="generator")
        ex = module.experts
        out = moegrad.MoE(r.config.dim, ex.hidden_dim, r.config.num_experts, r.config.top_k,
                          activation=ex.activation,
                          losses=module.losses, capacity_factor=module.capacity_factor,
                          **_router_kwargs(r.config, r.estimator), **opts)
        _copy_router_to_torch(r, out.router)
        weights = ex.stacked_weights()
        with torch.no_grad():
            for role, name in WEIGHT_NAMES.items():
                source = getattr(weights, role)
                if source is not None:  # up is None for GELU experts
                    target = getattr(out.experts, name)
                    target.copy_(_to_torch(source, target))
        _restore_low_precision(out.experts, weights.gate.dtype)
        _restore_low_precision(out.router.gate, r.gate.weight.dtype)
    elif isinstance(module, Router):
        opts = _options(module.estimator, drop="seed", add="generator")
        c = module.config
        out = moegrad.Router(c.dim, c.num_experts, c.top_k,
                             capacity_factor=c.capacity_factor, **_router_kwargs(c, module.estimator), **opts)
        _copy_router_to_torch(module, out)
        _restore_low_precision(out.gate, module.gate.weight.dtype)
    else:
        raise TypeError(f"to_torch expects a moegrad.mlx.MoE or moegrad.mlx.Router, got {type(module).__name__}")
    out.train(module.training)
    return out
