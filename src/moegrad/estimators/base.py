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
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from moegrad._spec import EstimatorOptions

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


class Estimator(EstimatorOptions, nn.Module):
    """PyTorch estimators' base class (its options, flags and checks:
    :class:`moegrad._spec.EstimatorOptions`). A subclass sets ``name`` and overrides
    :meth:`route` and, when needed, :meth:`mix` / :meth:`observe`; sampling estimators take a
    ``generator`` (a ``torch.Generator``; None: torch's global one)."""

    rng_option = "generator"
    check_rng = staticmethod(check_generator)

    def __init__(self, config: "RouterConfig", **options) -> None:
        super().__init__()
        self.set_options(config, options)

    def extra_repr(self) -> str:
        return self.options_repr(exclude=("generator",))

    def route(self, x: Tensor, z: Tensor, scores: Tensor, selection: "Selection") -> Picked:
        """x [T, D] fp32, z [T, E] tempered logits, scores [T, E] -> :class:`Picked`.

        ``selection`` (:class:`moegrad.selection.Selection`, built by the router for this call)
        holds ``config`` (the :class:`~moegrad.routing.RouterConfig`) and the selection-only
        ``bias``; ``selection.select_topk(scores)`` -> [T, K] indices (bias, group-limited top-k)
        and ``selection.combine_weights(scores, indices)`` -> [T, K] weights are the router's
        deterministic rules; ``num_experts`` and ``top_k`` view the config. (Before, the router
        itself was passed: an estimator that reads only these names works with either.)"""
        raise NotImplementedError

    def mix(self, y: Tensor, x: Tensor, routing: "Routing", experts: nn.Module) -> Tensor:
        """y [T, D] sparse MoE output -> [T, D]; the default adds nothing."""
        return y

    def observe(self, sums: Tensor, counts: Tensor) -> None:
        """sums [E, D] of expert outputs over routed tokens, counts [E] (training only; not
        called in activation checkpointing's recomputation, except under torch.compile, where
        the recomputation passes zero sums and counts: observing nothing must change nothing)."""

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
