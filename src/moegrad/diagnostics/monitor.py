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
saw no forward since the last read is left out. Every sum stays on the device until
:meth:`read` (no host sync per forward), updated in place with static shapes: under
``torch.compile(model)`` the hooks trace into the graph with no graph break and no recompile.

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

from moegrad.diagnostics.health import load_cv, max_violation, token_entropy
from moegrad.layer import MoE, MoEOutput
from moegrad.routing import Routing, is_router, pair_counts, recomputing_in_backward, unless_recomputing

__all__ = ["RoutingMonitor"]

#: the forwards a monitor keeps apart: training-mode and eval-mode ones
MODES = ("train", "eval")

_TENSORBOARD_HINT = ('RoutingMonitor: TensorBoard writing needs the tensorboard package: '
                     'pip install "moegrad[tensorboard]"')


def _routed_counts(routing: Routing) -> Tensor:
    """[E] int64 (token, slot) pairs of a :class:`Routing`, padding excluded (expert choice:
    the chosen pairs), as :class:`moegrad.Router` adds them to ``load_counts`` (static shapes)."""
    if routing.chosen is not None:
        chosen = routing.chosen if routing.mask is None else routing.chosen & routing.mask[:, None]
        return chosen.sum(0).long()
    return pair_counts(routing.indices, routing.mask, routing.scores.shape[-1])


def _entropy_sum(routing: Routing) -> tuple[Tensor, Tensor]:
    """(0-d float64 sum of the real tokens' :func:`token_entropy`, 0-d int64 real tokens)."""
    h = token_entropy(routing.scores)
    if routing.mask is None:
        return h.sum(), torch.tensor(h.shape[0], device=h.device)
    return torch.where(routing.mask, h, 0.0).sum(), routing.mask.sum()  # a padding NaN stays out


class _LayerSums:
    """One layer's running sums since the last read, [1] and [E] tensors updated in place (so
    under torch.compile the hooks trace into the graph with no graph break and no recompile).
    [1], not 0-d: torch 2.13's AOT autograd lost the in-place update of a 0-d float64 tensor
    (it stayed 0; float32, int64 and [1] float64 are kept)."""

    def __init__(self, num_experts: int, loss_names, device) -> None:
        def zero(dtype=torch.int64):
            return torch.zeros(1, dtype=dtype, device=device)
        self.forwards, self.tokens, self.dropped = zero(), zero(), zero()
        self.entropy = zero(torch.float64)
        self.counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.losses = {name: zero(torch.float64) for name in loss_names}  # sums
        self.loss_forwards = {name: zero() for name in loss_names}

    def tensors(self) -> list:
        return [self.forwards, self.tokens, self.dropped, self.entropy, self.counts,
                *self.losses.values(), *self.loss_forwards.values()]

    def add(self, routing: Routing, dropped: Optional[Tensor], losses: dict, keep: Tensor) -> None:
        """Add one forward; ``keep`` [1] int64: 1, or 0 for checkpointing's recomputation under
        torch.compile (then nothing changes)."""
        if self.counts.device != routing.scores.device:  # the model moved: so do the sums
            with torch.inference_mode(False):  # normal tensors, even from an inference_mode forward
                for name, value in vars(self).items():
                    if isinstance(value, Tensor):
                        setattr(self, name, value.to(routing.scores.device))
                    elif isinstance(value, dict):
                        setattr(self, name, {k: v.to(routing.scores.device) for k, v in value.items()})
        self.counts.add_(_routed_counts(routing) * keep)
        entropy, tokens = _entropy_sum(routing)
        self.entropy.add_(entropy * keep)
        self.tokens.add_(tokens * keep)
        if dropped is not None:
            self.dropped.add_(dropped.detach().long() * keep)
        for name, value in losses.items():
            if name not in self.losses:  # a name not known at construction (a recompile once)
                with torch.inference_mode(False):  # else later in-place adds outside it would fail
                    self.losses[name] = torch.zeros(1, dtype=torch.float64, device=self.counts.device)
                    self.loss_forwards[name] = torch.zeros(1, dtype=torch.int64, device=self.counts.device)
            self.losses[name].add_(value.detach().double() * keep)
            self.loss_forwards[name].add_(keep)
        self.forwards.add_(keep)

    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()


def _values(parts: list, prefix: str) -> dict:
    """The metrics (module docstring) of the summed ``parts`` (_LayerSums), {} if they saw no forward."""
    if not sum(int(p.forwards) for p in parts):
        return {}
    counts = sum(p.counts.cpu() for p in parts)
    tokens = sum(int(p.tokens) for p in parts)
    entropy = sum(float(p.entropy) for p in parts)
    out = {f"{prefix}/load_cv": load_cv(counts), f"{prefix}/max_violation": max_violation(counts),
           f"{prefix}/dead_experts": float((counts == 0).sum()),
           f"{prefix}/entropy": entropy / tokens if tokens else 0.0,
           f"{prefix}/dropped": float(sum(int(p.dropped) for p in parts))}
    names = dict.fromkeys(name for p in parts for name in p.losses)
    for name in names:
        seen = sum(int(p.loss_forwards[name]) for p in parts if name in p.losses)
        if seen:
            out[f"{prefix}/loss/{name}"] = sum(float(p.losses[name]) for p in parts if name in p.losses) / seen
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
                self._watch(name or "moe", m, self._moe_hook, m.router, m.losses)
                covered.add(id(m.router))
        for name, m in modules:  # moegrad.hf-patched blocks: the router is block.moegrad_router
            router = getattr(m, "moegrad_router", None)
            if router is not None and is_router(router) and id(router) not in covered:
                self._watch(name or "moe", m, self._hf_block_hook(router), router, getattr(router, "losses", {}))
                covered.add(id(router))
        for name, m in modules:  # any other router, alone
            if is_router(m) and id(m) not in covered:
                self._watch(name or "router", m, self._router_hook, m, {})
        if not self.layers:
            raise ValueError(f"RoutingMonitor: {type(model).__name__} holds no moegrad.MoE layer and no "
                             "router (moegrad.Router, or a model patched by moegrad.hf.patch)")
        self._writer = None
        if tensorboard_dir is not None and not isinstance(tensorboard_dir, (str, os.PathLike)):
            raise TypeError(f"RoutingMonitor: tensorboard_dir must be a str or os.PathLike (a directory) or "
                            f"None, got {type(tensorboard_dir).__name__}")
        if tensorboard_dir is not None:
            self._writer = self._summary_writer()(log_dir=str(tensorboard_dir))

    def _watch(self, name: str, module: nn.Module, hook, router: nn.Module, losses: dict) -> None:
        """Hook ``module`` (its ``router``; ``losses``: the balance losses it reports, known now
        so the sums exist before the first forward)."""
        self.layers[name] = module
        names = list(losses) + (["remoe_l1"] if getattr(router.config, "routing", None) == "remoe" else [])
        device = router.load_counts.device
        self._sums[name] = {mode: _LayerSums(router.config.num_experts, names, device) for mode in MODES}
        self._handles.append(module.register_forward_hook(
            lambda mod, args, out, _name=name: hook(_name, mod, out)))

    def _sums_of(self, name: str, module: nn.Module) -> tuple[Optional[_LayerSums], Optional[Tensor]]:
        """(the sums a forward of ``module`` adds to, by its mode; the [1] int64 factor ``keep``)
        or (None, None) for a forward re-run by activation checkpointing in backward (counted
        already). Under torch.compile that test runs at run time: keep = 0 in the re-run."""
        sums = self._sums[name]["train" if module.training else "eval"]
        one = torch.ones(1, dtype=torch.int64, device=sums.counts.device)
        if not module.training:
            return sums, one
        if torch.compiler.is_compiling():
            return sums, unless_recomputing(one, 0.0)
        return (None, None) if recomputing_in_backward() else (sums, one)

    def _moe_hook(self, name: str, module: nn.Module, out: MoEOutput) -> None:
        sums, keep = self._sums_of(name, module)
        if sums is not None:
            sums.add(out.routing, out.stats.dropped, out.losses, keep)

    def _hf_block_hook(self, router: nn.Module):
        def hook(name: str, module: nn.Module, out) -> None:
            sums, keep = self._sums_of(name, module)
            if sums is not None and router.last_routing is not None:
                sums.add(router.last_routing, None, router.last_losses, keep)
        return hook

    def _router_hook(self, name: str, module: nn.Module, out: Routing) -> None:
        sums, keep = self._sums_of(name, module)
        if sums is not None:
            sums.add(out, None, {}, keep)

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
            out.update(_values([by_mode[m] for m in modes], f"moe/{name}"))
        if reset:
            self.reset(mode)
        return out

    def reset(self, mode: Optional[str] = None) -> None:
        """Forget the forwards seen so far (``mode`` "train"/"eval": those only)."""
        for by_mode in self._sums.values():
            for m in self._modes(mode):
                by_mode[m].reset()

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
