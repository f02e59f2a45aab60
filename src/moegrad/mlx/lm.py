"""New router gradients for mlx-lm's MoE blocks (Mixtral, Qwen3-MoE), weights and forward kept.

    from mlx_lm.models import mixtral
    from moegrad.mlx import lm
    lm.patch(model, estimator="dense")    # every MoE block now routes through moegrad
    loss = ce(model(tokens)) + lm.aux_loss(model)   # balance losses, if any were asked for
    lm.unpatch(model)                      # the stock blocks back, same weights

Stock mlx-lm routes with ``stop_gradient(argpartition(...))`` and multiplies by the gathered
gates: the router learns only through the selected experts' weights, and with top-1
renormalised weights (Mixtral's softmax over the selected logits) not at all. A patched block
keeps the block's ``gate`` and ``switch_mlp`` (same parameter names, same SwitchGLU/gather_mm
compute) and replaces only the routing with a :class:`moegrad.mlx.Router` and its estimator:

=================  ==========================================================================
family             scores and weights (identical to the stock block's in value)
``mixtral``        s = softmax(z); w = s_S / sum_S s (= softmax of the selected logits)
``qwen3_moe``      s = softmax(z); w = s_S, renormalised if ``norm_topk_prob``
=================  ==========================================================================

The router runs in float32 whatever the model dtype. mlx-lm itself is never imported: blocks
are recognised by class name. The patched block adds frozen state (``load_counts``, and the
estimator's arrays) to ``model.parameters()``; :func:`unpatch` before saving a checkpoint that
stock mlx-lm must load strictly.
Shapes: T tokens, D model dim, H hidden dim, E experts, K top-k.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from moegrad.mlx.losses import balance_losses, check_losses
from moegrad.mlx.ops import counts as histogram
from moegrad.mlx.routing import Router

#: mlx-lm block class name -> family
FAMILIES = {"MixtralSparseMoeBlock": "mixtral", "Qwen3MoeSparseMoeBlock": "qwen3_moe"}


class SwitchExperts:
    """The experts of an mlx-lm ``SwitchGLU`` seen through moegrad's Experts interface
    (``dim``, ``hidden_dim``, ``num_experts``, ``stacked_weights``, ``every_expert``) for the
    estimators' :meth:`mix`. E_i(x) = down_i (silu(gate_i x) * (up_i x))."""

    def __init__(self, switch_mlp) -> None:
        self.mlp = switch_mlp
        self.num_experts, self.hidden_dim, self.dim = switch_mlp.gate_proj.weight.shape

    def stacked_weights(self) -> tuple:
        m = self.mlp
        return (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)

    def every_expert(self, x: mx.array, *weights: mx.array) -> mx.array:
        """x [t, D] -> [t, E, D]."""
        w1, w3, w2 = weights or self.stacked_weights()
        x = x.astype(mx.float32)
        h = nn.silu(x[None] @ w1.astype(mx.float32).swapaxes(-1, -2)) * (
            x[None] @ w3.astype(mx.float32).swapaxes(-1, -2))
        return (h @ w2.astype(mx.float32).swapaxes(-1, -2)).swapaxes(0, 1)


class MoEBlock(Router):
    """A patched mlx-lm MoE block: a :class:`moegrad.mlx.Router` holding the block's ``gate``
    (nn.Linear D -> E) and ``switch_mlp`` (SwitchGLU). ``__call__(x [..., D]) -> [..., D]``."""

    def __init__(self, block: nn.Module, estimator: str = "dense", losses: Optional[dict] = None,
                 **options) -> None:
        family = FAMILIES.get(type(block).__name__)
        if family is None:
            raise TypeError(f"cannot patch {type(block).__name__}; supported blocks: {sorted(FAMILIES)}")
        if getattr(block, "sharding_group", None) is not None:
            raise ValueError("sharded (distributed) mlx-lm MoE blocks are not supported")
        mlp = block.switch_mlp
        if type(mlp.activation).__name__ != "SwiGLU" or any("bias" in p for p in
                                                            (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            raise ValueError("only bias-free SwitchGLU experts with the SwiGLU activation are supported")
        num_experts, dim = block.gate.weight.shape
        if family == "mixtral":
            top_k, normalize = block.num_experts_per_tok, True
        else:
            top_k, normalize = block.top_k, bool(block.norm_topk_prob)
        super().__init__(dim, num_experts, top_k, score="softmax", normalize=normalize,
                         estimator=estimator, **options)
        self.gate = block.gate
        self.switch_mlp = block.switch_mlp
        self._original = block
        self._family = family
        self._losses = tuple(check_losses(losses or {}, estimator).items())
        self._aux = None

    @property
    def family(self) -> str:
        return self._family

    @property
    def aux_loss(self) -> Optional[mx.array]:
        """The weighted balance losses of the last call (None before any call)."""
        return self._aux

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.route(flat, self.gate_logits(flat), tuple(shape[:-1]))
        out = self.switch_mlp(flat, routing.indices)  # [T, K, D]
        if self.training and self.estimator.observes_outputs and flat.shape[0]:
            rows = mx.stop_gradient(out).astype(mx.float32).reshape(-1, shape[-1])
            sums = mx.zeros((self.num_experts, shape[-1]), dtype=mx.float32)
            sums = sums.at[routing.indices.reshape(-1)].add(rows)
            self.estimator.observe(sums, histogram(routing.indices, self.num_experts))
        y = (out * routing.weights[..., None].astype(out.dtype)).sum(axis=-2)
        y = self.estimator.mix(y, flat, routing, SwitchExperts(self.switch_mlp))
        self._aux = balance_losses(routing, dict(self._losses))[0] if self._losses else None
        return y.reshape(shape).astype(x.dtype)


def _moe_blocks(model: nn.Module, cls) -> list:
    """(parent, key, block) for every block of type ``cls`` (private attributes skipped)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, cls) or not name:
            continue
        parts = name.split(".")
        if any(p.startswith("_") for p in parts):
            continue
        parent = model
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        found.append((parent, parts[-1], module))
    return found


def _replace(parent, key: str, new) -> None:
    if isinstance(parent, list):
        parent[int(key)] = new
    else:
        setattr(parent, key, new)


def patch(model: nn.Module, estimator: str = "dense", losses: Optional[dict] = None, **options) -> int:
    """Replace every Mixtral / Qwen3-MoE block in ``model`` by a :class:`MoEBlock` with the given
    estimator (and its options) and balance ``losses``; returns how many were patched.
    Blocks already patched are re-patched from their original."""
    count = 0
    for parent, key, block in _moe_blocks(model, MoEBlock):
        _replace(parent, key, MoEBlock(block._original, estimator, losses, **options))
        count += 1
    for parent, key, block in _moe_blocks(model, nn.Module):
        if type(block).__name__ in FAMILIES:
            _replace(parent, key, MoEBlock(block, estimator, losses, **options))
            count += 1
    if count == 0:
        raise ValueError(f"{type(model).__name__} holds no supported MoE block ({sorted(FAMILIES)})")
    return count


def unpatch(model: nn.Module) -> int:
    """Put the stock mlx-lm blocks back (sharing the current weights); returns how many."""
    found = _moe_blocks(model, MoEBlock)
    for parent, key, block in found:
        _replace(parent, key, block._original)
    return len(found)


def aux_loss(model: nn.Module) -> mx.array:
    """Sum of the balance losses of every patched block's last call (0 if none asked for)."""
    total = mx.array(0.0)
    for _, _, block in _moe_blocks(model, MoEBlock):
        if block.aux_loss is not None:
            total = total + block.aux_loss
    return total
