"""Stacked expert weights and the grouped expert computation through ``mx.gather_mm``.

Shapes: N routed rows (sorted by expert), D model dim, H hidden dim, E experts.
Weights (the PyTorch layout): w1 [E, H, D], w3 [E, H, D] (SwiGLU only), w2 [E, D, H].

    swiglu: E_i(x) = w2_i (silu(w1_i x) * (w3_i x))
    gelu:   E_i(x) = w2_i gelu(w1_i x)

``mx.gather_mm`` runs only in float32 on MLX's CPU backend, so on the CPU other dtypes are
computed in float32 and the result is cast back to the input dtype.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from moegrad._checks import check_choice, check_int

ACTIVATIONS = ("gelu", "swiglu")


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
        up, down = 1 / math.sqrt(dim), 1 / math.sqrt(hidden_dim)
        self.w1 = mx.random.uniform(-up, up, (num_experts, hidden_dim, dim))
        if activation == "swiglu":
            self.w3 = mx.random.uniform(-up, up, (num_experts, hidden_dim, dim))
        self.w2 = mx.random.uniform(-down, down, (num_experts, dim, hidden_dim))

    def _extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
                f"activation={self.activation}")

    def stacked_weights(self) -> tuple:
        """(w1, w3, w2) for SwiGLU, (w1, w2) for GELU."""
        return (self.w1, self.w3, self.w2) if self.activation == "swiglu" else (self.w1, self.w2)

    def _hidden(self, up: mx.array, gate_up) -> mx.array:
        return nn.silu(up) * gate_up if gate_up is not None else nn.gelu(up)

    def __call__(self, rows: mx.array, experts: mx.array) -> mx.array:
        """rows [N, D] grouped by expert, experts [N] sorted expert ids -> [N, D]."""
        if rows.shape[0] == 0:
            return mx.zeros((0, self.dim), dtype=rows.dtype)
        weights = self.stacked_weights()
        dtype = rows.dtype
        if _needs_fp32(rows, *weights):
            rows, weights = rows.astype(mx.float32), tuple(w.astype(mx.float32) for w in weights)
        idx = mx.stop_gradient(experts).astype(mx.uint32)
        x = rows[:, None, :]  # [N, 1, D]

        def linear(a, w):  # a [N, 1, in], w [E, out, in] -> [N, 1, out]
            return mx.gather_mm(a, w.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=True)

        gate_up = linear(x, weights[1]) if len(weights) == 3 else None
        out = linear(self._hidden(linear(x, weights[0]), gate_up), weights[-1])
        return out[:, 0, :].astype(dtype)

    def every_expert(self, x: mx.array, *weights: mx.array) -> mx.array:
        """All experts on all tokens: x [t, D] -> [t, E, D] (the ``dense`` estimator's backward).

        ``weights`` are :meth:`stacked_weights` (possibly under stop_gradient).
        """
        weights = weights or self.stacked_weights()
        w1, w2 = weights[0], weights[-1]
        up = x[None] @ w1.swapaxes(-1, -2)  # [E, t, H]
        gate_up = x[None] @ weights[1].swapaxes(-1, -2) if len(weights) == 3 else None
        out = self._hidden(up, gate_up) @ w2.swapaxes(-1, -2)  # [E, t, D]
        return out.swapaxes(0, 1)
