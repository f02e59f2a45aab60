"""The MLX estimator interface (the twin of :mod:`moegrad.estimators.base`).

An estimator acts at two points: :meth:`Estimator.route` inside the router ([T, E] scores ->
[T, K] indices and weights) and :meth:`Estimator.mix` inside :class:`moegrad.mlx.MoE` after the
sparse combine (terms whose forward value is zero and whose backward carries a router gradient
for the unselected experts: ``dense``, ``default_moe``).

Shapes: T tokens, D model dim, E experts, K top-k.

Options are the PyTorch side's, except that the sampling estimators take ``seed`` (int or
None: MLX's global generator, see ``mx.random.seed``) where PyTorch takes a ``generator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import mlx.core as mx
import mlx.nn as nn

from moegrad.mlx.ops import Noise

if TYPE_CHECKING:  # pragma: no cover
    from moegrad.mlx.routing import Router, RouterConfig, Routing


@dataclass
class Picked:
    """An estimator's routing decision: indices [T, K] uint32, weights [T, K] fp32."""

    indices: mx.array
    weights: mx.array
    load_probs: Optional[mx.array] = None
    noise_std: Optional[mx.array] = None


class Estimator(nn.Module):
    """Base class: subclasses set ``name``, ``options`` (name -> default) and override
    :meth:`route` and, when needed, :meth:`mix` / :meth:`observe`."""

    name: ClassVar[str] = ""
    options: ClassVar[dict] = {}
    samples: ClassVar[bool] = False
    observes_outputs: ClassVar[bool] = False

    def __init__(self, config: "RouterConfig", **options) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = sorted(self.options) or "none"
            hint = (" (MLX estimators take seed=int instead of a torch generator)"
                    if "generator" in unknown and "seed" in self.options else "")
            raise TypeError(f"estimator {self.name!r} got unknown option(s) {unknown}; "
                            f"its options are: {allowed}{hint}")
        self.config = config
        for key, default in self.options.items():
            setattr(self, key, options.get(key, default))
        if self.samples:
            self._noise = Noise(self.seed)
            if config.grouped or config.selection_bias:
                raise ValueError(
                    f"estimator {self.name!r} samples its selection, which group-limited top-k "
                    "(n_group/topk_group) and selection_bias cannot be combined with; use a "
                    "deterministic estimator (topk, straight_through, dense, default_moe) there")

    def option_values(self) -> dict:
        """{option: value} as configured (what from_torch/to_torch carry over)."""
        return {k: getattr(self, k) for k in self.options}

    def _extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.option_values().items())

    def route(self, x: mx.array, z: mx.array, scores: mx.array, router: "Router") -> Picked:
        """x [T, D] fp32, z [T, E] tempered logits, scores [T, E] -> :class:`Picked`."""
        raise NotImplementedError(f"{type(self).__name__} must define route()")

    def mix(self, y: mx.array, x: mx.array, routing: "Routing", experts) -> mx.array:
        """y [T, D] sparse MoE output -> [T, D]; the default adds nothing."""
        return y

    def observe(self, sums: mx.array, counts: mx.array) -> None:
        """sums [E, D] of expert outputs over routed tokens, counts [E] (training only)."""
