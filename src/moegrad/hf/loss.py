"""The loss: how moegrad's balance losses reach ``outputs.loss`` of a patched model.

Each patched block stores A_b = sum_name coefficient * loss_name(routing) (its router's
``last_aux_loss``). The innermost module taking ``labels`` that holds patched blocks (the
transformers task model, e.g. ``Qwen3MoeForCausalLM``) gets :func:`_loss_forward`: with labels
and ``patch(..., losses=...)``,

    outputs.loss     = L_task + A,    A = sum_b A_b   (the family's own aux loss left out)
    outputs.aux_loss = A

and A is consumed. Without labels, :func:`aux_loss` returns A for a loss of the user's own.
Trainer, gradient accumulation and checkpointing notes: docs/hf.md.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from moegrad.hf.router import routers

__all__ = ["aux_loss"]


def _loss_forward(self: nn.Module, inner: Optional[Callable], *args, **kwargs):
    """The patched forward of the module that computes ``outputs.loss`` (see
    :func:`_loss_modules`, e.g. ``Qwen3MoeForCausalLM``); ``inner``: the forward it wraps.

    With ``labels`` and moegrad losses configured (``patch(..., losses=...)``):
    ``outputs.loss = L_task + A`` and ``outputs.aux_loss = A``, A = the sum over this module's
    patched blocks of their weighted moegrad losses (the value :func:`aux_loss` gives; consumed
    here, so a later :func:`aux_loss` returns 0 and warns). The family's own aux loss
    (``router_aux_loss_coef * load_balancing_loss``, which transformers adds when
    ``output_router_logits``) is then left out: the module runs without labels and L_task is its
    ``loss_function(logits, labels, vocab_size, **kwargs)``, as transformers computes it;
    ``router_logits`` are still returned. Without moegrad losses, or without labels, the
    module's forward runs unchanged, and a training forward with labels that adds no balance
    loss at all (``output_router_logits`` off or ``router_aux_loss_coef=0``) warns.
    """
    call = inner if inner is not None else functools.partial(type(self).forward, self)
    if args:
        kwargs = _as_keywords(call, args, kwargs)
    labels = kwargs.get("labels")
    if labels is None:
        return call(**kwargs)
    found = routers(self)
    config = getattr(self, "config", None)
    coef = getattr(self, "router_aux_loss_coef", None)  # None: the family has no aux loss
    record = kwargs.get("output_router_logits")
    record = bool(getattr(config, "output_router_logits", False) if record is None else record)
    if not any(r.losses for r in found):
        if coef is not None and not (record and coef) and self.training and torch.is_grad_enabled():
            why = "output_router_logits is off" if not record else "router_aux_loss_coef is 0"
            warnings.warn(
                f"{type(self).__name__}: this training forward with labels adds no balance loss "
                f"to outputs.loss: moegrad.hf.patch was given no losses= and {why} (transformers "
                "adds router_aux_loss_coef * its load-balancing loss only with "
                "output_router_logits=True). Pass losses={'switch': 1e-2} to moegrad.hf.patch, "
                "or output_router_logits=True to the model (or its config)", UserWarning,
                stacklevel=5)  # model(...) -> nn.Module.__call__ x2 -> _BoundForward -> here
        return call(**kwargs)
    return_dict = getattr(config, "return_dict", True)  # as transformers' can_return_tuple
    passed = kwargs.pop("return_dict", None)
    return_dict = return_dict if passed is None else passed
    if coef is not None and record:  # the family would add its own aux loss to the loss
        params = inspect.signature(call).parameters
        extra = {k: v for k, v in kwargs.items() if k not in params}
        out = call(**{**kwargs, "labels": None}, return_dict=True)
        vocab = getattr(self, "vocab_size", None) or config.vocab_size
        task = self.loss_function(out.logits, labels, vocab, **extra)
    else:
        out = call(**kwargs, return_dict=True)
        task = out.loss
    if task is None or not dataclasses.is_dataclass(out):
        raise TypeError(f"{type(self).__name__} returned no loss for labels ({type(out).__name__}"
                        "); moegrad.hf cannot add its balance losses: call it without labels "
                        "and add moegrad.hf.aux_loss(model) to your loss")
    aux = _collect(found, consume=True)
    if aux is None:
        aux = torch.zeros((), device=task.device)
    changes = {"loss": task + aux.to(task.device)}
    if "aux_loss" in {f.name for f in dataclasses.fields(out)}:
        changes["aux_loss"] = aux
    out = dataclasses.replace(out, **changes)
    return out if return_dict else out.to_tuple()


def _as_keywords(call: Callable, args: tuple, kwargs: dict) -> dict:
    """``call``'s positional ``args`` as keywords, merged with ``kwargs``."""
    names = [p.name for p in inspect.signature(call).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"forward takes {len(names)} positional arguments but {len(args)} were given")
    merged = dict(kwargs)
    for name, value in zip(names, args):
        if name in merged:
            raise TypeError(f"forward got multiple values for argument {name!r}")
        merged[name] = value
    return merged


def _takes_labels(module: nn.Module) -> bool:
    """True for a transformers model whose forward computes a loss from ``labels``."""
    if not hasattr(module, "config"):
        return False
    try:
        return "labels" in inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False


def _loss_modules(model: nn.Module, blocks: list) -> list:
    """The innermost modules of ``model`` (itself included) whose forward takes ``labels`` and
    that hold patched ``blocks``: the transformers task model (``XForCausalLM``, ...), not an
    outer wrapper (PEFT's ``PeftModelForCausalLM`` calls it). Each gets :func:`_loss_forward`."""
    ids = {id(b) for b, _ in blocks}
    holders = [m for m in model.modules()
               if _takes_labels(m) and any(id(c) in ids for c in m.modules())]
    return [m for m in holders
            if not any(o is not m and any(c is o for c in m.modules()) for o in holders)]


def aux_loss(model: nn.Module, clear: bool = True) -> Tensor:
    """Sum over patched blocks of the moegrad balance losses of the last forward (scalar fp32).

    For a forward without labels (e.g. a custom loss on the logits): ``loss = task_loss +
    aux_loss(model)``. A forward with labels already added them to ``outputs.loss`` (and
    ``outputs.aux_loss``) and consumed them: this then returns 0 with a UserWarning, so they are
    not counted twice. 0 when ``patch(..., losses=...)`` configured none. ``clear`` drops the
    stored values so the graph is not kept alive past the step. Raises RuntimeError when, with
    gradients enabled, a training router's stored loss has no gradient although its gate is
    trainable: the forward ran under no_grad, as reentrant activation checkpointing
    (``use_reentrant=True``) does, and adding the loss would silently train nothing.
    """
    found = routers(model)
    if not found:
        raise ValueError(f"{type(model).__name__} is not patched by moegrad.hf.patch")
    if all(r.last_aux_loss is None for r in found) and any(r.aux_loss_in_outputs for r in found):
        warnings.warn(
            "moegrad.hf.aux_loss: the balance losses of the last forward are already in "
            "outputs.loss and outputs.aux_loss (the model was called with labels); returning 0 "
            "so they are not counted twice. Train on outputs.loss alone", UserWarning,
            stacklevel=2)
    total = _collect(found, consume=False, clear=clear)
    if total is None:
        return torch.zeros((), device=found[0].load_counts.device)
    return total


def _collect(found: list, consume: bool, clear: bool = True) -> Optional[Tensor]:
    """Sum of the routers' stored ``last_aux_loss`` (None if none is stored). ``consume`` (the
    patched model adding it to ``outputs.loss``): clear it, keep ``last_losses`` detached and
    mark ``aux_loss_in_outputs``; else ``clear`` drops both. Raises RuntimeError for losses that
    lost their gradient (see :func:`aux_loss`)."""
    total = None
    for router in found:
        stored = router.last_aux_loss
        if (stored is not None and not stored.requires_grad and torch.is_grad_enabled()
                and router.training and router.gate_trains):
            raise RuntimeError(
                "moegrad.hf: the balance losses of the last training forward carry no "
                "gradient: the blocks ran under torch.no_grad, as reentrant activation "
                "checkpointing (use_reentrant=True) runs them; use use_reentrant=False "
                "(transformers' default) to train with patch(..., losses=...)")
        if stored is not None:
            total = stored if total is None else total + stored.to(total.device)
        if consume and stored is not None:
            router.last_aux_loss, router.aux_loss_in_outputs = None, True
            router.last_losses = {k: v.detach() for k, v in router.last_losses.items()}
        elif clear and not consume:
            router.last_aux_loss, router.last_losses = None, {}
    return total
