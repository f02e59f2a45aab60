"""The MLX router: gate logits -> scores -> top-k selection -> combine weights.

Shapes: T tokens, D model dim, E experts, K top-k. Same maths as :mod:`moegrad.routing`:

    z = x W_g^T                 [T, E]  fp32 gate logits (``Routing.logits``)
    s = score(z / temperature)  [T, E]  softmax or sigmoid (``Routing.scores``; ReLU gates
                                        with ``routing="remoe"``, :mod:`moegrad.mlx.remoe`)
    S = TopK(s + b)             [T, K]  selection; b the optional selection-only bias, and
                                        group-limited top-k may mask whole expert groups first
    w_i = c * s_i / (sum_S s)   [T, K]  (``normalize=True``; c = routed_scaling_factor)

Indices are uint32 arrays already under ``mx.stop_gradient``: no user code needs one.

The selection and the combine weights are :class:`~moegrad.mlx.selection.Selection`'s (built
per call from the config and the selection bias, and handed to the estimator's ``route``); the
config views and repr text are :class:`moegrad._spec.RouterViews`', shared with PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from moegrad._spec import (PAIR_ROUTINGS, RouterConfig, RouterViews, nonfinite_logits_message,
                           nonfinite_tempered_message, resolve_estimator)
from moegrad.mlx.estimators import build_estimator
from moegrad.mlx.ops import counts
from moegrad.mlx.selection import Selection, remoe_active


@dataclass
class Routing:
    """What a router decided for T tokens (fields as :class:`moegrad.Routing`).

    logits [T, E] fp32; scores [T, E] fp32; indices [T, K] uint32 (no gradient); weights
    [T, K] fp32 (differentiable as the estimator defines); ``shape`` the input's leading shape;
    ``mask`` [T] bool real tokens or None; ``load_probs``/``noise_std`` [T, E] (``noisy_topk``);
    ``chosen`` [T, E] bool (``routing="expert_choice"`` or ``"remoe"`` only): indices are then
    every expert [T, E], weights r * s * chosen, and only the chosen pairs are dispatched.
    """

    logits: mx.array
    scores: mx.array
    indices: mx.array
    weights: mx.array
    shape: tuple
    mask: Optional[mx.array] = None
    load_probs: Optional[mx.array] = None
    noise_std: Optional[mx.array] = None
    chosen: Optional[mx.array] = None

    @property
    def num_tokens(self) -> int:
        return self.logits.shape[0]


def flatten_tokens(x, dim: int, name: str = "x") -> mx.array:
    """[T, D] or [B, S, D] -> [T, D], validating type, dtype and feature size."""
    if not isinstance(x, mx.array):
        raise TypeError(f"{name} must be an mlx.core.array, got {type(x).__name__}")
    if not mx.issubdtype(x.dtype, mx.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape [T, D] or [B, S, D], got {tuple(x.shape)}")
    if x.shape[-1] != dim:
        raise ValueError(f"{name} has feature size {x.shape[-1]} but the module was built with dim={dim}")
    return x.reshape(-1, dim)


def flatten_mask(mask, shape: tuple) -> Optional[mx.array]:
    """Padding mask of the input's leading shape -> [T] bool (True = real token)."""
    if mask is None:
        return None
    if not isinstance(mask, mx.array):
        raise TypeError(f"mask must be an mlx.core.array of shape {tuple(shape)}, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; it must match the input's leading "
                         f"shape {tuple(shape)} (True marks real tokens, False padding)")
    if mask.dtype != mx.bool_:
        if mx.issubdtype(mask.dtype, mx.inexact) or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be bool (or integer 0/1): True/1 marks real tokens")
        mask = mask.astype(mx.bool_)
    return mask.reshape(-1)


class Router(RouterViews, nn.Module):
    """Top-k router with a pluggable gradient estimator (MLX twin of :class:`moegrad.Router`).

    Same arguments as the PyTorch router: dim, num_experts, top_k, routing, score, normalize, estimator
    (a name from :func:`moegrad.mlx.estimators.available`, extra keywords are its options),
    temperature, routed_scaling_factor, n_group/topk_group, selection_bias, check_finite,
    capacity_factor (``routing="expert_choice"`` only), l1_init, l1_alpha (``routing="remoe"``
    only).

    Arrays: ``gate.weight`` [E, D] (trainable); frozen state (saved with the weights, never
    trained): ``bias`` [E] fp32 when ``selection_bias``, ``load_counts`` [E] int64 counts of
    (token, slot) pairs routed in training mode since :meth:`reset_load_counts`,
    ``l1_coefficient`` 0-d fp32 ReMoE's current lambda (``routing="remoe"`` only).
    """

    #: called as ``observer(router, routing)`` after every training-mode call (MLX has no forward
    #: hooks; :class:`moegrad.mlx.QuantileBalancer` sets it), None otherwise
    observer = None

    def __init__(self, dim: int, num_experts: int, top_k: int, *, routing: str = "topk",
                 score: Optional[str] = None,
                 normalize: bool = False, estimator: Optional[str] = None, temperature: float = 1.0,
                 routed_scaling_factor: float = 1.0, n_group: Optional[int] = None,
                 topk_group: Optional[int] = None, selection_bias: bool = False,
                 check_finite: bool = True, capacity_factor: Optional[float] = None,
                 l1_init: Optional[float] = None, l1_alpha: Optional[float] = None,
                 **estimator_options) -> None:
        super().__init__()
        self.config = RouterConfig(dim, num_experts, top_k, score, normalize, temperature,
                                   routed_scaling_factor, n_group, topk_group, selection_bias,
                                   check_finite, routing, capacity_factor, l1_init, l1_alpha)
        estimator = resolve_estimator(estimator, self.config.routing)
        self.gate = nn.Linear(dim, num_experts, bias=False)
        frozen = ["load_counts"]
        if self.config.selection_bias:
            self.bias = mx.zeros((num_experts,), dtype=mx.float32)
            frozen.append("bias")
        if self.config.routing == "remoe":
            self.l1_coefficient = mx.array(self.config.l1_init, dtype=mx.float32)
            frozen.append("l1_coefficient")
        self.load_counts = mx.zeros((num_experts,), dtype=mx.int64)
        self.freeze(keys=frozen, recurse=False)
        self.estimator = build_estimator(estimator, self.config, **estimator_options)

    @property
    def selection_bias(self) -> Optional[mx.array]:
        return self.get("bias") if self.config.selection_bias else None

    def _extra_repr(self) -> str:
        return self.config_repr()

    def gate_logits(self, flat: mx.array) -> mx.array:
        """[T, D] -> [T, E] fp32 logits x W_g^T."""
        return flat.astype(mx.float32) @ self.gate.weight.astype(mx.float32).T

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None) -> Routing:
        """x: [T, D] or [B, S, D]; mask: optional bool of x's leading shape -> :class:`Routing`."""
        flat = flatten_tokens(x, self.config.dim)
        return self.route(flat, self.gate_logits(flat), tuple(x.shape[:-1]), mask)

    def route(self, flat: mx.array, logits: mx.array, shape: tuple,
              mask: Optional[mx.array] = None) -> Routing:
        """flat [T, D] tokens, logits [T, E] fp32 -> :class:`Routing` (the steps after the gate)."""
        token_mask = flatten_mask(mask, shape)
        c = self.config
        z = logits / c.temperature if c.temperature != 1.0 else logits
        if c.check_finite and logits.size and not bool(mx.isfinite(z).all()):
            if not bool(mx.isfinite(logits).all()):
                bad = int((~mx.isfinite(logits)).any(-1).sum())
                raise ValueError(nonfinite_logits_message(bad, logits.shape[0]))
            bad = int((~mx.isfinite(z)).any(-1).sum())
            raise ValueError(nonfinite_tempered_message(c.temperature, bad, logits.shape[0]))
        scores = self.score(z)
        if c.routing in PAIR_ROUTINGS:
            return self._route_pairs(logits, scores, shape, token_mask)
        picked = self.estimator.route(flat.astype(mx.float32), z, scores, self.selection(token_mask))
        if self.training and picked.indices.size:
            rows = picked.indices
            if token_mask is not None:  # padding rows go to an extra bin that is dropped
                rows = mx.where(token_mask[:, None], rows, self.num_experts)
            self.load_counts = self.load_counts + counts(rows, self.num_experts + 1)[:-1]
        routing = Routing(logits=logits, scores=scores, indices=picked.indices, weights=picked.weights,
                          shape=shape, mask=token_mask, load_probs=picked.load_probs,
                          noise_std=picked.noise_std)
        if self.training and self.observer is not None:  # e.g. QuantileBalancer's histograms
            self.observer(self, routing)
        return routing

    def _route_pairs(self, logits, scores, shape, token_mask) -> Routing:
        """Expert choice (:meth:`Selection.select_expert_choice`) or ReMoE (the positive ReLU
        gates, :func:`remoe_active`): indices [T, E] every expert, weights r * s * chosen (the
        gradient flows through the scores)."""
        if self.config.routing == "remoe":
            chosen = remoe_active(scores, token_mask)  # [T, E] bool
        else:
            chosen = self.selection(token_mask).select_expert_choice(scores)  # [T, E] bool
        t, e = scores.shape
        indices = mx.broadcast_to(mx.arange(e, dtype=mx.uint32), (t, e))
        weights = scores * chosen.astype(scores.dtype)
        if self.config.routed_scaling_factor != 1.0:
            weights = weights * self.config.routed_scaling_factor
        if self.training and t:
            self.load_counts = self.load_counts + chosen.astype(mx.int64).sum(0)
        routing = Routing(logits=logits, scores=scores, indices=indices, weights=weights,
                          shape=shape, mask=token_mask, chosen=chosen)
        if self.training and self.observer is not None:
            self.observer(self, routing)
        return routing

    # -- shared rules the estimators build on
    def score(self, z: mx.array) -> mx.array:
        """[T, E] tempered logits -> [T, E] scores (ReLU gates under ``routing="remoe"``)."""
        if self.config.score == "relu":
            return mx.maximum(z, 0.0)
        return mx.sigmoid(z) if self.config.score == "sigmoid" else mx.softmax(z, axis=-1, precise=True)

    def selection(self, mask: Optional[mx.array] = None) -> Selection:
        """This call's :class:`~moegrad.mlx.selection.Selection` (config, selection bias, mode,
        the call's token mask [T] or None)."""
        return Selection(self.config, self.selection_bias, self.training, mask)

    def select_topk(self, scores: mx.array) -> mx.array:
        """[T, E] scores -> [T, K] uint32 indices (:meth:`Selection.select_topk`)."""
        return self.selection().select_topk(scores)

    def combine_weights(self, scores: mx.array, indices: mx.array) -> mx.array:
        """[T, E] scores, [T, K] indices -> [T, K] weights (:meth:`Selection.combine_weights`)."""
        return self.selection().combine_weights(scores, indices)

    def reset_load_counts(self) -> mx.array:
        """Return the counts gathered since the last reset and zero them."""
        out = self.load_counts
        self.load_counts = mx.zeros_like(out)
        return out

    def __setitem__(self, key, value) -> None:
        """Keep the selection bias (and ReMoE's ``l1_coefficient``) fp32 (the PyTorch Router's
        ``_apply`` rule): ``set_dtype`` (and ``apply``/``update``/``load_weights``) store arrays
        through here. A lower-precision
        value that is the current bias rounded (``model.set_dtype(mx.bfloat16)``) leaves the
        exact fp32 bias in place; any other value is stored as fp32."""
        if key in ("bias", "l1_coefficient") and isinstance(value, mx.array) and value.dtype != mx.float32:
            current = self.get(key)
            if (current is not None and current.dtype == mx.float32 and current.shape == value.shape
                    and bool(mx.array_equal(current.astype(value.dtype), value))):
                value = current
            else:
                value = value.astype(mx.float32)
        super().__setitem__(key, value)
