"""The MLX estimator interface (the twin of :mod:`moegrad.estimators.base`).

An estimator acts at two points: :meth:`Estimator.route` inside the router ([T, E] scores ->
[T, K] indices and weights, given the call's :class:`~moegrad.mlx.selection.Selection`) and
:meth:`Estimator.mix` inside :class:`moegrad.mlx.MoE` after the sparse combine (terms whose
forward value is zero and whose backward carries a router gradient for the unselected experts:
``dense``, ``default_moe``).

Shapes: T tokens, D model dim, E experts, K top-k.

Options are the PyTorch side's, except that the sampling estimators take ``seed`` (int or
None: MLX's global generator, see ``mx.random.seed``) where PyTorch takes a ``generator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import mlx.core as mx
import mlx.nn as nn

from moegrad._checks import check_int
from moegrad._spec import EstimatorOptions
from moegrad.mlx.ops import Noise

if TYPE_CHECKING:  # pragma: no cover
    from moegrad.mlx.routing import RouterConfig, Routing
    from moegrad.mlx.selection import Selection


@dataclass
class Picked:
    """An estimator's routing decision: indices [T, K] uint32, weights [T, K] fp32."""

    indices: mx.array
    weights: mx.array
    load_probs: Optional[mx.array] = None
    noise_std: Optional[mx.array] = None


def topk_picked(scores: mx.array, selection: "Selection") -> Picked:
    """The deterministic top-k decision: [T, E] scores -> indices S = TopK(s + b) and weights
    c * s_S (renormalised if ``normalize``), as :class:`~moegrad.mlx.selection.Selection` gives them."""
    indices = selection.select_topk(scores)
    return Picked(indices, selection.combine_weights(scores, indices))


def _check_seed(seed) -> int:
    check_int("seed", seed, 0)
    return seed


class Estimator(EstimatorOptions, nn.Module):
    """Base class of the MLX estimators. A subclass sets ``name`` and overrides :meth:`route`
    (and :meth:`mix` / :meth:`observe` when it needs them); its options, their checks and its
    flags come from :class:`moegrad._spec.EstimatorOptions`, with ``seed`` (int or None) as the
    random-number option of the sampling estimators."""

    rng_option = "seed"
    check_rng = staticmethod(_check_seed)

    def __init__(self, config: "RouterConfig", **options) -> None:
        super().__init__()
        hint = (" (MLX estimators take seed=int instead of a torch generator)"
                if "generator" in options and self.samples else "")
        self.set_options(config, options, hint)
        if self.samples:
            self._noise = Noise(self.seed)

    def _extra_repr(self) -> str:
        return self.options_repr()

    def route(self, x: mx.array, z: mx.array, scores: mx.array, selection: "Selection") -> Picked:
        """x [T, D] fp32, z [T, E] tempered logits, scores [T, E], the router's
        :class:`~moegrad.mlx.selection.Selection` -> :class:`Picked`."""
        raise NotImplementedError(f"{type(self).__name__} must define route()")

    def mix(self, y: mx.array, x: mx.array, routing: "Routing", experts) -> mx.array:
        """y [T, D] sparse MoE output -> [T, D]; the default adds nothing."""
        return y

    def observe(self, sums: mx.array, counts: mx.array) -> None:
        """sums [E, D] of expert outputs over routed tokens, counts [E] (training only)."""
