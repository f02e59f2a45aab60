"""The interfaces PyTorch (:mod:`moegrad`) and MLX (:mod:`moegrad.mlx`) code is written against.

Plain Python (no torch, no mlx): the same names serve both frameworks, with their own array
type ``A``. Shapes: T tokens, N routed rows grouped by expert, D model dim, H hidden dim,
E experts, K top-k.

**Expert weights** are a named tuple, never a tuple read by its length. :class:`ExpertWeights`
is the SwiGLU / GELU layout every moegrad experts module and the HF SwiGLU families use::

    gate [E, H, D]   the activated projection (moegrad's ``w1``, HF ``gate_proj``)
    up   [E, H, D]   SwiGLU only, else None   (moegrad's ``w3``, HF ``up_proj``)
    down [E, D, H]                            (moegrad's ``w2``, HF ``down_proj``)

    swiglu: E_i(x) = down_i (silu(gate_i x) * (up_i x))
    gelu:   E_i(x) = down_i gelu(gate_i x)

An experts module with another layout (GPT-OSS: biases and a clamped GLU) returns its own
named tuple; the callers below only pass it back to the same module.

**The experts protocol** (:class:`ExpertsModule`) is what the layer's forward sequence and the
estimators that evaluate unselected experts (``dense``, expert-parallel ``dense``, the
diagnostics) need from an experts module.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Protocol, runtime_checkable


class ExpertWeights(NamedTuple):
    """The stacked weights of E SwiGLU / GELU experts (see the module docstring for shapes), in
    the order of moegrad's former ``(w1, w3, w2)`` tuple; ``up`` is None for GELU experts."""

    gate: Any
    up: Optional[Any]
    down: Any

    @property
    def activation(self) -> str:
        """"swiglu" when there is an ``up`` projection, else "gelu"."""
        return "gelu" if self.up is None else "swiglu"


def rebuild_weights(kind: type, values) -> tuple:
    """A weights tuple of type ``kind`` (a named tuple such as :class:`ExpertWeights`, or a
    plain tuple) from its entries in order (e.g. tensors saved for backward)."""
    return kind._make(values) if hasattr(kind, "_make") else tuple(values)


@runtime_checkable
class ExpertsModule(Protocol):
    """An experts module: E experts applied to rows grouped by expert.

    ``num_experts`` E, ``dim`` D, ``hidden_dim`` H;
    ``stacked_weights()`` -> its weights as a named tuple (:class:`ExpertWeights` or the module's own);
    ``__call__(rows [N, D], counts [E]) -> [N, D]``: expert e on its ``counts[e]`` consecutive
    rows (MLX: ``__call__(rows [N, D], experts [N])``, the expert of each row);
    ``every_expert(x [T, D], weights) -> [T, E, D]``: every expert on every token, with
    ``weights`` from :meth:`stacked_weights` (possibly detached or cast), for the ``dense`` estimator
    and the diagnostics.

    Optional: ``unselected_inner_products(x [T, D], grad_y [T, D], indices [T, K], weights)
    -> [T, E]``, <grad_y_t, E_i(x_t)> for the unselected experts only (0 for the selected);
    without it the ``dense`` estimator forms them from :meth:`every_expert`.
    """

    num_experts: int
    dim: int
    hidden_dim: int

    def stacked_weights(self) -> tuple: ...

    def every_expert(self, x: Any, weights: tuple) -> Any: ...
