"""Stacked expert weights and the grouped expert computation through ``mx.gather_mm``.

Shapes: N routed rows (sorted by expert), D model dim, H hidden dim, E experts.
Weights (the PyTorch layout), handed around as :class:`moegrad._interfaces.ExpertWeights`:
gate = w1 [E, H, D], up = w3 [E, H, D] (SwiGLU only, else None), down = w2 [E, D, H].

    swiglu: E_i(x) = down_i (silu(gate_i x) * (up_i x))
    gelu:   E_i(x) = down_i gelu(gate_i x)

:class:`Experts` implements the :class:`~moegrad._interfaces.ExpertsModule` protocol
(``__call__(rows, experts)``, ``stacked_weights()``, ``every_expert(x, weights)``); the helpers
:func:`present`, :func:`cast_weights` and :func:`stop_weights` act on any weights named tuple
field by field, so no caller reads a weights tuple by its length.

``mx.gather_mm`` runs only in float32 on MLX's CPU backend, so on the CPU other dtypes are
computed in float32 and the result is cast back to the input dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from moegrad._checks import check_choice, check_int
from moegrad._interfaces import ExpertWeights

ACTIVATIONS = ("gelu", "swiglu")

#: ExpertWeights role -> the stacked array's name (the same in :class:`moegrad.Experts`)
WEIGHT_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}


def present(weights: tuple) -> tuple:
    """The arrays of a weights named tuple, without its absent (None) fields."""
    return tuple(w for w in weights if w is not None)


def cast_weights(weights: tuple, dtype) -> tuple:
    """A weights named tuple with every array cast to ``dtype`` (absent fields stay None)."""
    return type(weights)(*(None if w is None else w.astype(dtype) for w in weights))


def stop_weights(weights: tuple) -> tuple:
    """A weights named tuple with every array under ``mx.stop_gradient`` (absent fields stay None)."""
    return type(weights)(*(None if w is None else mx.stop_gradient(w) for w in weights))


def activate(gate: mx.array, up: Optional[mx.array]) -> mx.array:
    """The hidden activation: silu(gate) * up (SwiGLU) or gelu(gate) (``up`` None)."""
    return nn.silu(gate) * up if up is not None else nn.gelu(gate)


def _needs_fp32(*arrays) -> bool:
    on_cpu = mx.default_device() == mx.cpu
    return on_cpu and any(a.dtype != mx.float32 for a in arrays)


class Experts(nn.Module):
    """E feed-forward experts with stacked weights.

    ``__call__(rows [N, D], experts [N]) -> [N, D]`` runs expert ``experts[n]`` on row n; the
    rows must be grouped by expert (``experts`` sorted ascending), as a
    :class:`~moegrad.mlx.dispatch.DispatchPlan` gives them.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, activation: str = "swiglu") -> None:
        super().__init__()
        check_int("dim", dim, 1)
        check_int("hidden_dim", hidden_dim, 1)
        check_int("num_experts", num_experts, 1)
        check_choice("activation", activation, ACTIVATIONS)
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.activation = activation
        bound_in, bound_hidden = 1 / math.sqrt(dim), 1 / math.sqrt(hidden_dim)  # U(-1/sqrt(fan_in), .)
        self.w1 = mx.random.uniform(-bound_in, bound_in, (num_experts, hidden_dim, dim))  # gate
        if activation == "swiglu":
            self.w3 = mx.random.uniform(-bound_in, bound_in, (num_experts, hidden_dim, dim))  # up
        self.w2 = mx.random.uniform(-bound_hidden, bound_hidden, (num_experts, dim, hidden_dim))  # down

    def _extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
                f"activation={self.activation}")

    def stacked_weights(self) -> ExpertWeights:
        """:class:`~moegrad._interfaces.ExpertWeights` (gate=w1, down=w2, up=w3 or None for GELU)."""
        return ExpertWeights(gate=self.w1, down=self.w2,
                             up=self.w3 if self.activation == "swiglu" else None)

    def __call__(self, rows: mx.array, experts: mx.array) -> mx.array:
        """rows [N, D] grouped by expert, experts [N] sorted expert ids -> [N, D]."""
        if rows.shape[0] == 0:
            return mx.zeros((0, self.dim), dtype=rows.dtype)
        weights = self.stacked_weights()
        dtype = rows.dtype
        if _needs_fp32(rows, *present(weights)):
            rows, weights = rows.astype(mx.float32), cast_weights(weights, mx.float32)
        idx = mx.stop_gradient(experts).astype(mx.uint32)
        x = rows[:, None, :]  # [N, 1, D]

        def linear(a, w):  # a [N, 1, in], w [E, out, in] -> [N, 1, out]
            return mx.gather_mm(a, w.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=True)

        up = linear(x, weights.up) if weights.up is not None else None
        hidden = activate(linear(x, weights.gate), up)  # [N, 1, H]
        return linear(hidden, weights.down)[:, 0, :].astype(dtype)

    def every_expert(self, x: mx.array, weights: Optional[ExpertWeights] = None) -> mx.array:
        """All experts on all tokens: x [t, D] -> [t, E, D] (the ``dense`` estimator's backward).

        ``weights``: :meth:`stacked_weights` (possibly under stop_gradient); None reads them.
        """
        if weights is None:
            weights = self.stacked_weights()
        gate = x[None] @ weights.gate.swapaxes(-1, -2)  # [E, t, H]
        up = x[None] @ weights.up.swapaxes(-1, -2) if weights.up is not None else None
        out = activate(gate, up) @ weights.down.swapaxes(-1, -2)  # [E, t, D]
        return out.swapaxes(0, 1)
