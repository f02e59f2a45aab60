"""RoutingMonitor: each MoE layer's routing health over the forwards since the last read.

Shapes: T tokens, E experts. For every MoE layer of a model (each :class:`moegrad.MoE`, each
block of a ``moegrad.hf``-patched model, each other :class:`moegrad.Router`, found with
:func:`moegrad.routing.is_router`), forward hooks add up what the forward already computed,
with no extra forward pass, over the forwards since the last :meth:`read` (training-mode and
eval-mode forwards are kept apart: ``read(mode="train")`` / ``read(mode="eval")`` give one
kind, ``read()`` both; a forward re-run by activation checkpointing in backward is counted
once):

    counts_i        (token, slot) pairs routed to expert i, padding excluded      [E]
                    (``MoEOutput.stats.tokens_per_expert``; a router's Routing.indices / chosen)
    load_cv         std(counts) / mean(counts)       :func:`moegrad.diagnostics.health.load_cv`
    max_violation   max_i counts_i / mean(counts) - 1     :func:`~moegrad.diagnostics.health.max_violation`
    dead_experts    #{i : counts_i = 0}
    entropy         token-weighted mean over forwards of
                    :func:`~moegrad.diagnostics.health.router_entropy` (real tokens' scores)
    dropped         pairs dropped by capacity, summed (``MoEStats.dropped``; 0 when dropless)
    loss/<name>     mean over forwards of each balance loss, unweighted (``MoEOutput.losses``,
                    ``HFRouter.last_losses``)

:meth:`read` returns them as a flat dict of floats keyed ``"moe/<layer name>/<metric>"``
(the layer name is the module's qualified name, "moe" for the model itself); a layer that
saw no forward since the last read is left out. Counts, drops and losses stay on the device
until :meth:`read`; the entropy is read to the host once per layer forward.

    monitor = RoutingMonitor(model)                 # or RoutingMonitor(model, tensorboard_dir="runs")
    for step, batch in enumerate(loader):
        ...
        if step % 50 == 0:
            print(monitor.read())                   # or monitor.write_tensorboard(writer, step)
    monitor.remove()
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor, nn

from moegrad.diagnostics.health import load_cv, max_violation, router_entropy
from moegrad.layer import MoE, MoEOutput
from moegrad.routing import Routing, is_router, recomputing_in_backward

__all__ = ["RoutingMonitor"]

#: the forwards a monitor keeps apart: training-mode and eval-mode ones
MODES = ("train", "eval")

_TENSORBOARD_HINT = ('RoutingMonitor: TensorBoard writing needs the tensorboard package: '
                     'pip install "moegrad[tensorboard]"')


def _routed_counts(routing: Routing) -> Tensor:
    """[E] int64 (token, slot) pairs of a :class:`Routing`, padding excluded (expert choice:
    the chosen pairs), as :class:`moegrad.Router` adds them to ``load_counts``."""
    num_experts = routing.scores.shape[-1]
    if routing.chosen is not None:
        chosen = routing.chosen if routing.mask is None else routing.chosen[routing.mask]
        return chosen.sum(0).long()
    rows = routing.indices if routing.mask is None else routing.indices[routing.mask]
    return torch.bincount(rows.reshape(-1), minlength=num_experts)


def _real_scores(routing: Routing) -> Tensor:
    """[T', E] scores of the real (non-padding) tokens."""
    return routing.scores if routing.mask is None else routing.scores[routing.mask]


class _LayerSums:
    """One layer's running sums since the last read."""

    def __init__(self) -> None:
        self.forwards, self.tokens, self.entropy = 0, 0, 0.0
        self.counts: Optional[Tensor] = None
        self.dropped: Optional[Tensor] = None
        self.losses: dict = {}
        self.loss_forwards: dict = {}

    def add(self, routing: Routing, dropped: Optional[Tensor], losses: dict) -> None:
        counts = _routed_counts(routing).detach()
        self.counts = counts if self.counts is None else self.counts + counts.to(self.counts.device)
        scores = _real_scores(routing)
        tokens = scores.shape[0]
        self.entropy += router_entropy(scores) * tokens
        self.tokens += tokens
        if dropped is not None:
            d = dropped.detach().long()
            self.dropped = d if self.dropped is None else self.dropped + d.to(self.dropped.device)
        for name, value in losses.items():
            v = value.detach().float()
            self.losses[name] = v if name not in self.losses else self.losses[name] + v.to(self.losses[name].device)
            self.loss_forwards[name] = self.loss_forwards.get(name, 0) + 1
        self.forwards += 1

    def merged(self, other: "_LayerSums") -> "_LayerSums":
        """The sums of both (``self`` and ``other`` unchanged)."""
        out = _LayerSums()
        for part in (self, other):
            if not part.forwards:
                continue
            out.forwards += part.forwards
            out.tokens += part.tokens
            out.entropy += part.entropy
            for attr in ("counts", "dropped"):
                mine, theirs = getattr(out, attr), getattr(part, attr)
                if theirs is not None:
                    setattr(out, attr, theirs if mine is None else mine + theirs.to(mine.device))
            for name, total in part.losses.items():
                out.losses[name] = total if name not in out.losses else out.losses[name] + total.to(
                    out.losses[name].device)
                out.loss_forwards[name] = out.loss_forwards.get(name, 0) + part.loss_forwards[name]
        return out

    def values(self, prefix: str) -> dict:
        counts = self.counts.cpu()
        out = {f"{prefix}/load_cv": load_cv(counts), f"{prefix}/max_violation": max_violation(counts),
               f"{prefix}/dead_experts": float((counts == 0).sum()),
               f"{prefix}/entropy": self.entropy / self.tokens if self.tokens else 0.0,
               f"{prefix}/dropped": float(self.dropped) if self.dropped is not None else 0.0}
        for name, total in self.losses.items():
            out[f"{prefix}/loss/{name}"] = float(total) / self.loss_forwards[name]
        return out


class RoutingMonitor:
    """Routing health of every MoE layer of ``model`` since the last :meth:`read` (module
    docstring: the metrics and keys), from forward hooks: no extra forward pass.

    Args:
        model: an ``nn.Module`` holding :class:`moegrad.MoE` layers, a ``moegrad.hf``-patched
            model, or any model with :class:`moegrad.Router` s.
        tensorboard_dir: optional directory: :meth:`write_tensorboard` then writes there
            through its own ``torch.utils.tensorboard.SummaryWriter`` (needs ``tensorboard``:
            ``pip install "moegrad[tensorboard]"``).
    """

    def __init__(self, model: nn.Module, tensorboard_dir: Optional[str] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"RoutingMonitor: model must be an nn.Module, got {type(model).__name__}")
        self.layers: dict[str, nn.Module] = {}
        self._sums: dict[str, dict[str, _LayerSums]] = {}  # name -> {"train", "eval"} -> sums
        self._handles: list = []
        covered: set = set()
        modules = list(model.named_modules())
        for name, m in modules:
            if isinstance(m, MoE):
                self._watch(name or "moe", m, self._moe_hook)
                covered.add(id(m.router))
        for name, m in modules:  # moegrad.hf-patched blocks: the router is block.moegrad_router
            router = getattr(m, "moegrad_router", None)
            if router is not None and is_router(router) and id(router) not in covered:
                self._watch(name or "moe", m, self._hf_block_hook(router))
                covered.add(id(router))
        for name, m in modules:  # any other router, alone
            if is_router(m) and id(m) not in covered:
                self._watch(name or "router", m, self._router_hook)
        if not self.layers:
            raise ValueError(f"RoutingMonitor: {type(model).__name__} holds no moegrad.MoE layer and no "
                             "router (moegrad.Router, or a model patched by moegrad.hf.patch)")
        self._writer = None
        if tensorboard_dir is not None and not isinstance(tensorboard_dir, (str, os.PathLike)):
            raise TypeError(f"RoutingMonitor: tensorboard_dir must be a str or os.PathLike (a directory) or "
                            f"None, got {type(tensorboard_dir).__name__}")
        if tensorboard_dir is not None:
            self._writer = self._summary_writer()(log_dir=str(tensorboard_dir))

    def _watch(self, name: str, module: nn.Module, hook) -> None:
        self.layers[name] = module
        self._sums[name] = {mode: _LayerSums() for mode in MODES}
        self._handles.append(module.register_forward_hook(
            lambda mod, args, out, _name=name: hook(_name, mod, out)))

    def _sums_of(self, name: str, module: nn.Module) -> Optional[_LayerSums]:
        """The sums a forward of ``module`` adds to (by its mode); None for a forward re-run
        by activation checkpointing in backward (counted already)."""
        if module.training and recomputing_in_backward():
            return None
        return self._sums[name]["train" if module.training else "eval"]

    def _moe_hook(self, name: str, module: nn.Module, out: MoEOutput) -> None:
        sums = self._sums_of(name, module)
        if sums is not None:
            sums.add(out.routing, out.stats.dropped, out.losses)

    def _hf_block_hook(self, router: nn.Module):
        def hook(name: str, module: nn.Module, out) -> None:
            sums = self._sums_of(name, module)
            if sums is not None and router.last_routing is not None:
                sums.add(router.last_routing, None, router.last_losses)
        return hook

    def _router_hook(self, name: str, module: nn.Module, out: Routing) -> None:
        sums = self._sums_of(name, module)
        if sums is not None:
            sums.add(out, None, {})

    @torch.no_grad()
    def read(self, reset: bool = True, mode: Optional[str] = None) -> dict:
        """{"moe/<layer>/<metric>": float} over the forwards since the last reset (layers with
        none left out): ``mode`` "train" or "eval" the training-mode or eval-mode forwards
        only, None both; ``reset=False`` keeps accumulating (else the forwards read are
        forgotten, the other mode's kept)."""
        if not isinstance(reset, bool):
            raise TypeError(f"RoutingMonitor.read: reset must be True or False, got {reset!r}")
        modes = self._modes(mode)
        out = {}
        for name, by_mode in self._sums.items():
            sums = by_mode[modes[0]] if len(modes) == 1 else by_mode["train"].merged(by_mode["eval"])
            if sums.forwards:
                out.update(sums.values(f"moe/{name}"))
        if reset:
            self.reset(mode)
        return out

    def reset(self, mode: Optional[str] = None) -> None:
        """Forget the forwards seen so far (``mode`` "train"/"eval": those only)."""
        for by_mode in self._sums.values():
            for m in self._modes(mode):
                by_mode[m] = _LayerSums()

    @staticmethod
    def _modes(mode: Optional[str]) -> tuple:
        if mode is None:
            return MODES
        if mode not in MODES:
            raise ValueError(f"RoutingMonitor: mode={mode!r} must be None (both), 'train' or 'eval'")
        return (mode,)

    def write_tensorboard(self, writer=None, step: Optional[int] = None, reset: bool = True,
                          mode: Optional[str] = None) -> dict:
        """:meth:`read` (``reset``, ``mode``) and write each value with
        ``writer.add_scalar(key, value, step)`` (``writer`` None: the monitor's own, from
        ``tensorboard_dir``); returns the values."""
        if writer is None:
            if self._writer is None:
                raise ValueError("RoutingMonitor.write_tensorboard: writer=None needs "
                                 "RoutingMonitor(model, tensorboard_dir=...); or pass a SummaryWriter")
            writer = self._writer
        elif not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"RoutingMonitor.write_tensorboard: writer must be a SummaryWriter (anything with "
                            f"add_scalar(tag, value, step)) or None, got {type(writer).__name__}")
        values = self.read(reset=reset, mode=mode)
        for key, value in values.items():
            writer.add_scalar(key, value, step)
        return values

    @staticmethod
    def _summary_writer():
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises ImportError when tensorboard is missing
            raise ImportError(_TENSORBOARD_HINT) from e
        return SummaryWriter

    def remove(self) -> None:
        """Remove the hooks (and close the monitor's own SummaryWriter)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._writer is not None:
            self._writer.close()
            self._writer = None
