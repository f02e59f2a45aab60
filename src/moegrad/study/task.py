"""What a study task is: the :class:`Task` interface, its :class:`Probe`, router initialisations.

A task builds its data from a seed (nothing is downloaded), builds a model around
:class:`moegrad.MoE` layers for a given estimator, and knows its loss, its evaluation and, when
it can, a probe for the gradient diagnostics. The tasks themselves are
:mod:`moegrad.study.clusters` and :mod:`moegrad.study.charlm`; :mod:`moegrad.study.tasks` is
their table. Shapes: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

import moegrad
from moegrad._checks import check_choice
from moegrad.diagnostics import purity

from moegrad.study.options import REGIMES, ROUTER_INITS, ROUTER_STD, layer_estimator  # noqa: F401


def init_router(weight: Tensor, how: str) -> None:
    """Set a router gate weight [E, D] in place by :data:`ROUTER_INITS` rule ``how``."""
    check_choice("router_init", how, ROUTER_INITS)
    with torch.no_grad():
        if how == "zero":
            weight.zero_()
        elif how == "normal":
            weight.normal_(0.0, ROUTER_STD)
        # "uniform": keep nn.Linear's initialisation


def top_expert(routing) -> tuple[Tensor, Tensor]:
    """Each token's highest-weight routed expert: -> (expert [T] int64, routed [T] bool).

    Token choice (``routing.chosen`` None): expert = indices[:, 0], the top-scored of its K,
    and routed is all True. Pair routings (expert_choice, remoe: chosen [T, E]): expert =
    argmax_e over the chosen pairs of scores[t, e] (the combine weight's score factor), and
    routed[t] = any_e chosen[t, e]; a token no expert took has expert 0 and routed False."""
    if routing.chosen is None:
        first = routing.indices[:, 0]
        return first, torch.ones_like(first, dtype=torch.bool)
    masked = routing.scores.detach().masked_fill(~routing.chosen, float("-inf"))
    routed = routing.chosen.any(-1)
    return masked.argmax(-1).masked_fill(~routed, 0), routed


def routed_purity(routing, truth: Tensor, num_experts: int, num_classes: int) -> float:
    """Purity of each token's :func:`top_expert` against truth [T] class ids:
    sum_i max_c n(i, c) / T, n(i, c) counting the routed tokens of class c whose top expert is
    i; T counts every token, so a token no expert took (pair routings) counts as impure.
    Token choice: :func:`moegrad.diagnostics.purity` of the first choice."""
    expert, routed = top_expert(routing)
    if bool(routed.all()):
        return purity(expert, truth, num_experts, num_classes)
    part = purity(expert[routed], truth[routed], num_experts, num_classes) if bool(routed.any()) else 0.0
    return part * int(routed.sum()) / truth.numel()


def active_experts(routing) -> float:
    """Mean number of experts per real token: K (indices.shape[1]) for token choice,
    mean_t sum_e chosen[t, e] over the real tokens (``routing.mask``) for pair routings."""
    if routing.chosen is None:
        return float(routing.indices.shape[1])
    chosen = routing.chosen if routing.mask is None else routing.chosen[routing.mask]
    return float(chosen.sum(-1).double().mean()) if chosen.shape[0] else 0.0


@dataclass
class Probe:
    """What :func:`moegrad.diagnostics.gradient_fidelity` needs: one MoE layer, its input
    x [T, D] and per-token losses loss_fn(y [T, D]) -> [T] of that layer's output."""

    moe: moegrad.MoE
    x: Tensor
    loss_fn: Callable[[Tensor], Tensor]


class Task:
    """Base class: ``name``, ``description``, ``has_truth`` (ground-truth routing known) and
    the methods below. ``seed`` fixes the data; the model seed is given to :meth:`build`."""

    name = ""
    description = ""
    has_truth = False
    #: the budget of ``--quick`` and of the default run: (steps, seeds)
    quick = (300, 2)
    full = (1500, 5)
    #: expert compute backend passed to every moegrad.MoE (see moegrad.experts.IMPLS)
    impl = "auto"
    #: routing method passed to every moegrad.MoE (``routing=``, :data:`moegrad._spec.ROUTINGS`)
    routing = "topk"
    #: build the routers with ``selection_bias=True`` (``--balancer bias|quantile``)
    selection_bias = False
    #: the balancer stepped after every optimiser step, one of
    #: :data:`~moegrad.study.options.BALANCERS` (recorded in :meth:`settings`)
    balancer = "none"
    #: initial router weights, one of :data:`ROUTER_INITS`
    router_init = "zero"
    #: whether the MoE layers' input carries a gradient (then the backward also computes the
    #: input gradient of the experts and of the router: see :mod:`moegrad.study.flops`)
    moe_input_grad = False

    def build(self, estimator: str, options: dict, losses: dict, seed: int) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def router_init_default(cls) -> str:
        """The constructor's default ``router_init``."""
        return inspect.signature(cls.__init__).parameters["router_init"].default

    def layer_kwargs(self, estimator: str) -> dict:
        """moegrad.MoE keywords every layer of :meth:`build` gets for the study's ``estimator``:
        ``estimator`` (None for :data:`~moegrad.study.options.NO_ESTIMATOR`, i.e. remoe),
        ``impl``, ``routing`` and, with a balancer, ``selection_bias=True``."""
        kwargs = {"estimator": layer_estimator(estimator), "impl": self.impl, "routing": self.routing}
        if self.selection_bias:
            kwargs["selection_bias"] = True
        return kwargs

    def moes(self, model: nn.Module) -> list:
        return [m for m in model.modules() if isinstance(m, moegrad.MoE)]

    #: training batches are kept in memory while the stream holds at most this many tensor
    #: elements (clusters --quick: 800 batches, 7M), so the runs after the first replay them
    #: instead of drawing them again; a longer stream is drawn anew for every run
    cache_elements = 1 << 25

    def stream_seed(self) -> int:
        """Seed of the training batch stream."""
        raise NotImplementedError

    def draw(self, g: torch.Generator):
        """The next training batch from the stream's generator ``g``."""
        raise NotImplementedError

    def reset(self) -> None:
        """Restart the training batch stream, so every run sees the same batches."""
        self._pos = 0
        if not hasattr(self, "_batches"):
            self._batches, self._caching, self._cached = [], True, 0
            self._g = torch.Generator().manual_seed(self.stream_seed())
        elif not self._caching:
            self._g = torch.Generator().manual_seed(self.stream_seed())

    def new_stream(self) -> None:
        """Forget the cached batches and restart the stream (after the stream seed changed)."""
        for name in ("_batches", "_caching", "_cached"):
            self.__dict__.pop(name, None)
        self.reset()

    def batch(self, step: int):
        """The next batch of the stream (the ``step``-th since :meth:`reset`): drawn from the
        generator the first time, replayed from memory afterwards (:attr:`cache_elements`)."""
        if self._pos < len(self._batches):
            out = self._batches[self._pos]
        else:  # while caching, the generator stands at len(self._batches)
            out = self.draw(self._g)
            if self._caching:
                size = sum(t.numel() for t in out)
                if self._cached + size <= self.cache_elements:
                    self._batches.append(out)
                    self._cached += size
                else:  # too long to keep: every run draws it from the seed again
                    self._caching, self._batches = False, []
        self._pos += 1
        return out

    def loss(self, model: nn.Module, batch) -> tuple[Tensor, Tensor, list]:
        """-> (task loss, aux loss, [MoEOutput per layer])."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        raise NotImplementedError

    def probe(self, model: nn.Module) -> Optional[Probe]:
        return None

    def config(self) -> dict:
        return {}

    def settings(self) -> dict:
        """The cell settings this task fixes (JSON-ready): task, top_k, num_experts,
        router_init, lr, routing, balancer and the task's own knobs (the run adds regime and losses)."""
        return {"task": self.name, "top_k": self.top_k, "num_experts": self.num_experts,
                "router_init": self.router_init, "lr": self.lr, "routing": self.routing,
                "balancer": self.balancer}

    def init_routers(self, model: nn.Module) -> nn.Module:
        """Apply :attr:`router_init` to every MoE layer's gate; returns the model."""
        for moe in self.moes(model):
            init_router(moe.router.gate.weight, self.router_init)
        return model

    def shifted(self) -> "Task":
        """The fine-tuning distribution of ``--regime finetune``: a new task of the same
        shapes (same model fits both) whose data differ from this one's."""
        raise NotImplementedError(f"task {self.name!r} has no shifted distribution")

    def val_inputs(self) -> list:
        """Model inputs of the validation batches (what compare_routing feeds the models)."""
        raise NotImplementedError

    def backbone_flops(self, batch) -> int:
        """FLOPs of one training step (forward + backward) outside the MoE layers, by the
        convention of :mod:`moegrad.study.flops`. 0 when the model is one MoE layer."""
        return 0
