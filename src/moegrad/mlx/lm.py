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
are recognised by class name.

Structure: :class:`MoEBlock` is a :class:`moegrad.mlx.Router` (gate -> scores -> estimator ->
Routing) whose forward after routing is :func:`moegrad.mlx.layer.run_experts`, the same
sequence as :class:`moegrad.mlx.MoE` (dispatch -> experts -> observe -> combine ->
estimator.mix), with :class:`SwitchExperts` presenting the block's SwitchGLU as moegrad experts:
the (token, slot) pairs are sorted by expert (as SwitchGLU sorts them itself) and each row goes
through the SwitchGLU's own call.

Quantized models (``nn.quantize`` / ``mlx_lm.convert -q``: ``QuantizedLinear`` gates and
``QuantizedSwitchLinear`` experts, the usual case for fine-tuning) and adapter-wrapped layers
(mlx-lm's LoRA/DoRA, applied before or after :func:`patch`) run through the layers' own calls,
so a patched block computes exactly what the stock block computes: the gate logits are
``gate(x)`` on float32 activations, and the ``dense`` estimator evaluates the unselected experts
by calling ``switch_mlp`` on every (token, expert) pair (``gather_qmm`` for quantized experts; no
dequantized copy of the weights is made). Only plain ``nn.Linear`` gates and ``SwitchLinear``
experts are read as float weights. Quantized layers are frozen: what changes is the gradient
they pass on (to the block's input and to trainable layers such as LoRA adapters or an
unquantized gate). Other gate or expert layer types are refused at patch time.

The patched block adds frozen state (``load_counts``, and the estimator's arrays) to
``model.parameters()``; :func:`unpatch` before saving a checkpoint that stock mlx-lm must load
strictly.
Shapes: T tokens, D model dim, H hidden dim, E experts, K top-k.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from moegrad._interfaces import ExpertWeights
from moegrad._spec import TOKEN_CHOICE_ROUTINGS, check_losses, check_routing
from moegrad.mlx.experts import activate, cast_weights
from moegrad.mlx.layer import run_experts
from moegrad.mlx.losses import balance_losses
from moegrad.mlx.routing import Router

#: mlx-lm block class name -> family
FAMILIES = {"MixtralSparseMoeBlock": "mixtral", "Qwen3MoeSparseMoeBlock": "qwen3_moe"}


#: expert projection layers (mlx-lm ``switch_layers``), recognised by class name
SWITCH_LINEARS = ("SwitchLinear", "QuantizedSwitchLinear")


def _base(layer: nn.Module) -> nn.Module:
    """The layer an adapter wraps (mlx-lm's LoRA/DoRA keep it as ``.linear``), else the layer."""
    while isinstance(layer.get("linear"), nn.Module):
        layer = layer["linear"]
    return layer


def _gate_dims(gate: nn.Module, where: str) -> tuple:
    """(num_experts, dim) of a block's gate: an nn.Linear or nn.QuantizedLinear (packed weight),
    possibly wrapped by an adapter."""
    base = _base(gate)
    if isinstance(base, nn.QuantizedLinear):
        dims = (base.weight.shape[0], base.scales.shape[-1] * base.group_size)
    elif isinstance(base, nn.Linear):
        dims = tuple(base.weight.shape)
    else:
        raise ValueError(
            f"{where}: its gate is a {type(gate).__name__}; supported gates are nn.Linear and "
            "nn.QuantizedLinear (also wrapped by mlx-lm's LoRA/DoRA layers)")
    if "bias" in base:
        raise ValueError(f"{where}: its gate has a bias; Mixtral / Qwen3-MoE gates are bias-free "
                         "and a gate bias is not supported")
    return dims


class SwitchExperts:
    """The experts of an mlx-lm ``SwitchGLU`` seen through moegrad's experts interface
    (:class:`moegrad._interfaces.ExpertsModule`: ``dim``, ``hidden_dim``, ``num_experts``,
    ``__call__``, ``stacked_weights``, ``every_expert``) for :func:`moegrad.mlx.layer.run_experts`
    and the estimators' :meth:`mix`. E_i(x) = down_i (silu(gate_i x) * (up_i x)).

    When the projections are not all plain ``SwitchLinear`` (quantized, or wrapped by LoRA)
    there are no float weights to stack: :meth:`stacked_weights` is None and
    :meth:`every_expert` runs the SwitchGLU itself on every (token, expert) pair, exactly the
    forward's computation."""

    def __init__(self, switch_mlp) -> None:
        self.mlp = switch_mlp
        projections = (switch_mlp.gate_proj, switch_mlp.up_proj, switch_mlp.down_proj)
        self.plain = all(type(p).__name__ == "SwitchLinear" for p in projections)
        gate = _base(switch_mlp.gate_proj)
        self.num_experts, self.hidden_dim, self.dim = gate.num_experts, gate.output_dims, gate.input_dims

    def __call__(self, rows: mx.array, experts: mx.array) -> mx.array:
        """rows [N, D] grouped by expert, experts [N] their expert ids -> [N, D]: the SwitchGLU's
        own call (gather_mm / gather_qmm, adapters included) with one expert per row."""
        if rows.shape[0] == 0:
            return mx.zeros((0, self.dim), dtype=rows.dtype)
        return self.mlp(rows, experts[:, None])[:, 0, :]

    def stacked_weights(self) -> Optional[ExpertWeights]:
        """:class:`~moegrad._interfaces.ExpertWeights` of plain ``SwitchLinear`` projections;
        None when they are quantized or adapter-wrapped (no float weights)."""
        if not self.plain:
            return None
        m = self.mlp
        return ExpertWeights(gate=m.gate_proj.weight, down=m.down_proj.weight, up=m.up_proj.weight)

    def every_expert(self, x: mx.array, weights: Optional[ExpertWeights] = None) -> mx.array:
        """x [t, D] -> [t, E, D] fp32; ``weights`` from :meth:`stacked_weights` (None: read them,
        or run the SwitchGLU when there are none)."""
        x = x.astype(mx.float32)
        if not self.plain:
            every = mx.broadcast_to(mx.arange(self.num_experts, dtype=mx.uint32),
                                    (x.shape[0], self.num_experts))  # [t, E]
            return self.mlp(x, every).astype(mx.float32)
        if weights is None:
            weights = self.stacked_weights()
        weights = cast_weights(weights, mx.float32)
        gate = x[None] @ weights.gate.swapaxes(-1, -2)  # [E, t, H]
        up = x[None] @ weights.up.swapaxes(-1, -2)
        return (activate(gate, up) @ weights.down.swapaxes(-1, -2)).swapaxes(0, 1)


class MoEBlock(Router):
    """A patched mlx-lm MoE block: a :class:`moegrad.mlx.Router` holding the block's ``gate``
    (D -> E: nn.Linear or nn.QuantizedLinear, possibly LoRA-wrapped) and ``switch_mlp``
    (SwitchGLU). ``__call__(x [..., D]) -> [..., D]``.

    A subclass rather than a module holding a Router: the block's ``gate`` must stay at
    ``<block>.gate`` (and ``switch_mlp`` beside it) in the model's parameter tree, where mlx-lm's
    checkpoints, ``load_weights`` and LoRA conversion (``linear_to_lora_layers``, by key) find
    it; a held router would move it to ``<block>.router.gate`` or hold it twice."""

    def __init__(self, block: nn.Module, estimator: str = "dense", losses: Optional[dict] = None,
                 **options) -> None:
        family = FAMILIES.get(type(block).__name__)
        if family is None:
            raise TypeError(f"cannot patch {type(block).__name__}; supported blocks: {sorted(FAMILIES)}")
        if getattr(block, "sharding_group", None) is not None:
            raise ValueError("sharded (distributed) mlx-lm MoE blocks are not supported")
        where = f"cannot patch {type(block).__name__}"
        mlp = block.switch_mlp
        projections = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if type(mlp.activation).__name__ != "SwiGLU" or any("bias" in _base(p) for p in projections):
            raise ValueError(f"{where}: only bias-free SwitchGLU experts with the SwiGLU activation "
                             "are supported")
        odd = sorted({type(_base(p)).__name__ for p in projections} - set(SWITCH_LINEARS))
        if odd:
            raise ValueError(f"{where}: its experts hold {odd} layers; supported expert layers are "
                             f"{list(SWITCH_LINEARS)} (also wrapped by mlx-lm's LoRA layers)")
        num_experts, dim = _gate_dims(block.gate, where)
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

    def gate_logits(self, flat: mx.array) -> mx.array:
        """[T, D] -> [T, E] fp32 logits: x W^T in fp32 for a plain nn.Linear gate, else the
        gate's own call on fp32 activations (quantized matmul, LoRA adapter, ...)."""
        if type(self.gate) is nn.Linear:
            return super().gate_logits(flat)
        return self.gate(flat.astype(mx.float32)).astype(mx.float32)

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
        y, _ = run_experts(flat, routing, SwitchExperts(self.switch_mlp), self.estimator,
                           training=self.training)
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


def patch(model: nn.Module, estimator: str = "dense", losses: Optional[dict] = None,
          routing: str = "topk", **options) -> int:
    """Replace every Mixtral / Qwen3-MoE block in ``model`` by a :class:`MoEBlock` with the given
    estimator (and its options), balance ``losses`` and ``routing`` ("topk", or "sinkhorn":
    the training-mode top-k of the Sinkhorn-balanced scores, as :func:`moegrad.hf.patch`; the
    block's eval forward stays mlx-lm's); returns how many were patched. Blocks already patched
    are re-patched from their original."""
    check_routing(routing)
    if routing not in TOKEN_CHOICE_ROUTINGS:
        raise ValueError(f"routing={routing!r} is not supported by moegrad.mlx.lm.patch (the patched "
                         "block keeps mlx-lm's token-choice top-k); choose one of "
                         f"{list(TOKEN_CHOICE_ROUTINGS)}")
    options["routing"] = routing
    count = 0
    for parent, key, block in _moe_blocks(model, MoEBlock):
        original = block._original
        original.gate, original.switch_mlp = block.gate, block.switch_mlp
        _replace(parent, key, MoEBlock(original, estimator, losses, **options))
        count += 1
    for parent, key, block in _moe_blocks(model, nn.Module):
        if type(block).__name__ in FAMILIES:
            _replace(parent, key, MoEBlock(block, estimator, losses, **options))
            count += 1
    if count == 0:
        raise ValueError(f"{type(model).__name__} holds no supported MoE block ({sorted(FAMILIES)})")
    return count


def unpatch(model: nn.Module) -> int:
    """Put the stock mlx-lm blocks back, holding the patched blocks' current ``gate`` and
    ``switch_mlp`` (their weights, and any adapter added after patching); returns how many."""
    found = _moe_blocks(model, MoEBlock)
    for parent, key, block in found:
        original = block._original
        original.gate, original.switch_mlp = block.gate, block.switch_mlp  # e.g. LoRA added since
        _replace(parent, key, original)
    return len(found)


def aux_loss(model: nn.Module) -> mx.array:
    """Sum of the balance losses of every patched block's last call (0 if none asked for)."""
    total = mx.array(0.0)
    for _, _, block in _moe_blocks(model, MoEBlock):
        if block.aux_loss is not None:
            total = total + block.aux_loss
    return total
