"""The estimator interface.

An estimator decides how the router's top-k turns into combine weights and how the router's
gradient is formed. It acts at two points:

* :meth:`Estimator.route` inside the router: ``[T, E]`` scores -> ``[T, K]`` indices and weights;
* :meth:`Estimator.mix` inside :class:`moegrad.MoE`, after the sparse combine: may add terms whose
  forward value is zero (or a documented extra) and whose backward carries a router gradient
  for the unselected experts (``dense``, ``default_moe``).

Shapes: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from moegrad.routing import Router, RouterConfig, Routing


@dataclass
class Picked:
    """An estimator's routing decision: indices [T, K] int64, weights [T, K] fp32."""

    indices: Tensor
    weights: Tensor
    load_probs: Optional[Tensor] = None
    noise_std: Optional[Tensor] = None


class Estimator(nn.Module):
    """Base class. Subclasses set ``name``, ``options`` (name -> default) and override
    :meth:`route` and, when needed, :meth:`mix` / :meth:`observe`."""

    name: ClassVar[str] = ""
    options: ClassVar[dict] = {}
    #: draws random numbers in training mode (refuses group-limited top-k and selection bias)
    samples: ClassVar[bool] = False
    #: wants per-expert sums of expert outputs (:meth:`observe`) in training mode
    observes_outputs: ClassVar[bool] = False

    def __init__(self, config: "RouterConfig", **options) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = sorted(self.options) or "none"
            raise TypeError(f"estimator {self.name!r} got unknown option(s) {unknown}; "
                            f"its options are: {allowed}")
        self.config = config
        for key, default in self.options.items():
            setattr(self, key, options.get(key, default))
        if self.samples and (config.grouped or config.selection_bias):
            raise ValueError(
                f"estimator {self.name!r} samples its selection, which group-limited top-k "
                "(n_group/topk_group) and selection_bias cannot be combined with; use a "
                "deterministic estimator (topk, straight_through, dense, default_moe) there")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options if k != "generator")

    def route(self, x: Tensor, z: Tensor, scores: Tensor, router: "Router") -> Picked:
        """x [T, D] fp32, z [T, E] tempered logits, scores [T, E] -> :class:`Picked`."""
        raise NotImplementedError

    def mix(self, y: Tensor, x: Tensor, routing: "Routing", experts: nn.Module) -> Tensor:
        """y [T, D] sparse MoE output -> [T, D]; the default adds nothing."""
        return y

    def observe(self, sums: Tensor, counts: Tensor) -> None:
        """sums [E, D] of expert outputs over routed tokens, counts [E] (training only)."""

    # -- helpers for sampling estimators
    def _uniform(self, like: Tensor) -> Tensor:
        """U(0, 1) noise shaped like ``like`` from the optional ``generator`` option, in (0, 1)."""
        u = torch.rand(like.shape, generator=getattr(self, "generator", None),
                       device=like.device, dtype=like.dtype)
        tiny = torch.finfo(like.dtype).tiny
        return u.clamp(tiny, 1.0 - torch.finfo(like.dtype).eps)

    def _gumbel(self, like: Tensor) -> Tensor:
        """Standard Gumbel noise G = -log(-log U)."""
        return -torch.log(-torch.log(self._uniform(like)))
