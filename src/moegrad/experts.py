"""Stacked expert weights and the grouped expert computation.

Shapes: N routed rows (sorted by expert), D model dim, H hidden dim, E experts.
Weights: w1 [E, H, D], w3 [E, H, D] (SwiGLU only), w2 [E, D, H].

    swiglu: E_i(x) = w2_i (silu(w1_i x) * (w3_i x))
    gelu:   E_i(x) = w2_i gelu(w1_i x)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moegrad._checks import check_choice, check_int

ACTIVATIONS = ("gelu", "swiglu")
#: grouped-compute backends; "auto" picks one by a measured rule
IMPLS = ("auto", "loop")


class Experts(nn.Module):
    """E feed-forward experts with stacked weights.

    ``forward(rows [N, D], counts [E]) -> [N, D]`` runs expert e on its ``counts[e]``
    consecutive rows. The per-expert weight views are taken once with ``unbind(0)``, so backward
    accumulates one stacked gradient instead of a full-size zero tensor per expert.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, activation: str = "swiglu",
                 impl: str = "auto") -> None:
        super().__init__()
        check_int("dim", dim, 1)
        check_int("hidden_dim", hidden_dim, 1)
        check_int("num_experts", num_experts, 1)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("impl", impl, IMPLS)
        self.dim, self.hidden_dim, self.num_experts, self.activation = dim, hidden_dim, num_experts, activation
        self.impl = impl
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim)) if activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear's default bound."""
        for w, fan_in in ((self.w1, self.dim), (self.w3, self.dim), (self.w2, self.hidden_dim)):
            if w is not None:
                nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
                f"activation={self.activation}, impl={self.impl}")

    def stacked_weights(self) -> tuple:
        """(w1, w3, w2) for SwiGLU, (w1, w2) for GELU."""
        return (self.w1, self.w3, self.w2) if self.w3 is not None else (self.w1, self.w2)

    def _hidden(self, up: Tensor, gate_up: Tensor | None) -> Tensor:
        return F.silu(up) * gate_up if gate_up is not None else F.gelu(up)

    def forward(self, rows: Tensor, counts: Tensor) -> Tensor:
        """rows [N, D] grouped by expert, counts [E] int -> [N, D] expert outputs."""
        if rows.shape[0] == 0:
            return rows.new_zeros(0, self.dim)
        w1s, w2s = self.w1.unbind(0), self.w2.unbind(0)
        w3s = self.w3.unbind(0) if self.w3 is not None else [None] * self.num_experts
        outs = []
        for e, chunk in enumerate(rows.split(counts.tolist())):
            if chunk.shape[0] == 0:
                continue
            gate_up = F.linear(chunk, w3s[e]) if w3s[e] is not None else None
            outs.append(F.linear(self._hidden(F.linear(chunk, w1s[e]), gate_up), w2s[e]))
        return torch.cat(outs)

    def every_expert(self, x: Tensor, *weights: Tensor) -> Tensor:
        """All experts on all tokens: x [t, D] -> [t, E, D] (used by the ``dense`` estimator).

        ``weights`` are this module's :meth:`stacked_weights` (possibly detached).
        """
        w1, w2 = weights[0], weights[-1]
        up = torch.einsum("td,ehd->teh", x, w1)
        gate_up = torch.einsum("td,ehd->teh", x, weights[1]) if len(weights) == 3 else None
        return torch.einsum("teh,edh->ted", self._hidden(up, gate_up), w2)
