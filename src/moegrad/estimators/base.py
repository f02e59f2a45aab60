"""The estimator interface.

An estimator decides how the router's top-k turns into combine weights and how the router's
gradient is formed. It acts at two points:

* :meth:`Estimator.route` inside the router: ``[T, E]`` scores -> ``[T, K]`` indices and weights,
  given the router's :class:`~moegrad.selection.Selection` (its ``config``, ``select_topk`` and
  ``combine_weights``: the shared selection-bias, group-limited top-k and weighting rules);
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

from moegrad._spec import EstimatorSpec, attach_spec, estimator_options

if TYPE_CHECKING:  # pragma: no cover
    from moegrad.routing import RouterConfig, Routing
    from moegrad.selection import Selection


@dataclass
class Picked:
    """An estimator's routing decision: indices [T, K] int64, weights [T, K] fp32."""

    indices: Tensor
    weights: Tensor
    load_probs: Optional[Tensor] = None
    noise_std: Optional[Tensor] = None


def check_generator(generator) -> "torch.Generator":
    """The sampling estimators' ``generator`` option: a torch.Generator (None is handled by the
    caller: torch's global generator)."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (e.g. torch.Generator()."
                        f"manual_seed(0)) or None, got {type(generator).__name__} ({generator!r})")
    return generator


class Estimator(nn.Module):
    """Base class. A subclass sets ``name`` and overrides :meth:`route` and, when needed,
    :meth:`mix` / :meth:`observe`. A built-in name takes its options (with their checks) and
    its ``samples`` / ``observes_outputs`` flags from :data:`moegrad._spec.ESTIMATORS`; a new
    name (a user's own estimator) declares ``options`` {name: default} and the flags itself.
    Each option becomes an attribute of the instance; sampling estimators also take
    ``generator``."""

    name: ClassVar[str] = ""
    #: option name -> default (from the spec; ``generator`` for sampling estimators)
    options: ClassVar[dict] = {}
    #: draws random numbers in training mode (refuses group-limited top-k and selection bias)
    samples: ClassVar[bool] = False
    #: wants per-expert sums of expert outputs (:meth:`observe`) in training mode
    observes_outputs: ClassVar[bool] = False
    #: the validated option table (:data:`moegrad._spec.ESTIMATORS`, or the class's own options)
    spec: ClassVar[EstimatorSpec]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        attach_spec(cls, "generator")

    def __init__(self, config: "RouterConfig", **options) -> None:
        super().__init__()
        values = estimator_options(self.spec, config, options, "generator", check_generator)
        self.config = config
        for key, value in values.items():
            setattr(self, key, value)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options if k != "generator")

    def route(self, x: Tensor, z: Tensor, scores: Tensor, selection: "Selection") -> Picked:
        """x [T, D] fp32, z [T, E] tempered logits, scores [T, E] -> :class:`Picked`.

        ``selection`` (:class:`moegrad.selection.Selection`, built by the router for this call)
        holds ``config`` (the :class:`~moegrad.routing.RouterConfig`) and the selection-only
        ``bias``; ``selection.select_topk(scores)`` -> [T, K] indices (bias, group-limited top-k)
        and ``selection.combine_weights(scores, indices)`` -> [T, K] weights are the router's
        deterministic rules. (Before, the router itself was passed; it has the same three names,
        so an estimator written against it works with either.)"""
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
