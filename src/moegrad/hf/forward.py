"""The patched forwards: how :func:`moegrad.hf.patch` replaces a module's ``forward`` and what
the replacements compute.

Shapes: B batch, S sequence, T = B*S tokens, D hidden size, E routed experts, K per token.

``_bind(fn, module)`` sets ``module.forward`` to a :class:`_BoundForward` (picklable, keeps the
replaced forward's signature), ``_unbind`` restores the previous one. The block forward
(:func:`_moe_forward`), per block of a supported family:

    x = x * U(1 - j, 1 + j)                   training-mode input jitter (Mixtral, PhiMoE)
    routing = block.moegrad_router(x)         [T, K] indices and weights (:class:`HFRouter`)
    y = router.experts_forward(x, routing)    [T, D] dispatch, experts, combine, estimator.mix
    y += shared experts                       Qwen2-MoE: sigmoid(shared_expert_gate(x)) *
                                              shared_expert(x); DeepSeek-V3: shared_experts(x)

and the forward a self-sampling gate gets (:func:`_gate_logits`, PhiMoE). The task model's
loss forward is :func:`moegrad.hf.loss._loss_forward`.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moegrad.hf.router import HFRouter
from moegrad.losses import balance_losses
from moegrad.routing import Routing, recomputing_in_backward

__all__: list[str] = []  # internal: installed by moegrad.hf.patch


class _BoundForward:
    """``module.forward`` set by :func:`patch`: calls ``fn(module, inner, *args, **kwargs)``.

    A bound method of a module-level function that pickles and deep-copies with its module
    (``types.MethodType(fn, module)`` pickles as ``getattr(module, fn.__name__)``, which does
    not exist). ``inner`` is the ``forward`` the instance held before :func:`patch` (None: the
    class's), restored by :func:`unpatch`; ``__signature__`` is the replaced forward's, so
    ``inspect.signature(module.forward)`` (transformers' Trainer and ``generate`` read it) is
    unchanged.
    """

    def __init__(self, fn: Callable, module: nn.Module, inner: Optional[Callable] = None) -> None:
        self.__func__, self.__self__, self.inner = fn, module, inner

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, self.inner, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        inner = self.inner if self.inner is not None else type(self.__self__).forward.__get__(self.__self__)
        return inspect.signature(inner)

    def __repr__(self) -> str:
        return f"<moegrad.hf {self.__func__.__name__} of {type(self.__self__).__name__}>"


def _bind(fn: Callable, module: nn.Module) -> None:
    """Set ``module.forward`` to ``fn`` bound to ``module`` (see :class:`_BoundForward`)."""
    module.forward = _BoundForward(fn, module, module.__dict__.get("forward"))


def _unbind(module: nn.Module) -> bool:
    """Give ``module`` back the forward it had before :func:`_bind`; False if not bound."""
    bound = module.__dict__.get("forward")
    if not isinstance(bound, _BoundForward):
        return False
    if bound.inner is None:
        del module.forward
    else:
        module.forward = bound.inner
    return True


def _moe_forward(self: nn.Module, inner: Optional[Callable], hidden_states: Tensor) -> Tensor:
    """The patched block forward: hidden_states [B, S, D] -> [B, S, D]
    (GPT-OSS: and the combine weights [T, K], as its block returns). Replaces the block's
    forward (``inner`` is not called)."""
    router: HFRouter = self.moegrad_router
    family = router.family
    shape = hidden_states.shape
    # training-mode input jitter x * U(1 - j, 1 + j): the block's (Mixtral, PhiMoE), then the
    # one PhiMoE's HF gate applies in place to the block's input (so its experts see both)
    jitters = (getattr(self, family.jitter) if family.jitter else 0.0,
               getattr(router.gate, family.gate_jitter) if family.gate_jitter else 0.0)
    for jitter in jitters:
        if self.training and jitter > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - jitter, 1.0 + jitter)
    flat = hidden_states.reshape(-1, shape[-1])
    routing = router(flat, shape=tuple(shape[:-1]))
    y = router.experts_forward(flat, routing)
    if family.shared == "gated":
        y = y + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
    elif family.shared == "plain":
        y = y + self.shared_experts(flat)
    # under activation checkpointing the recomputation must save the same tensors as the
    # forward (so the losses are computed again) but keeps the forward's stored values (under
    # torch.compile the test would be a graph break: the re-run stores its equal values again)
    keep = torch.compiler.is_compiling() or not (self.training and recomputing_in_backward())
    if router.losses:
        losses = balance_losses(routing, router.losses)
        if keep:
            router.last_aux_loss, router.last_losses = losses
            router.aux_loss_in_outputs = False
    if keep:
        router.last_routing = _detached(routing)
    if family.returns_weights:
        return y.reshape(shape), routing.weights.to(y.dtype)
    return y.reshape(shape)


def _gate_logits(gate: nn.Module, inner: Optional[Callable], hidden_states: Tensor) -> tuple:
    """The forward :func:`patch` gives a gate that samples its own routing (PhiMoE's
    ``PhimoeTopKRouter``, an ``nn.Linear`` whose forward also draws a SparseMixer sample):
    hidden_states [T, D] -> (logits [T, E] = x W^T, None, None), the HF output tuple without its
    routing, which moegrad's estimator computes instead. Called through the module, so its
    hooks fire and transformers' ``output_router_logits`` recording (index 0) is unchanged."""
    return F.linear(hidden_states, gate.weight, gate.bias), None, None


def _detached(r: Routing) -> Routing:
    """A copy of ``r`` without autograd history (kept on the router for inspection)."""
    d = lambda t: t.detach() if t is not None else None  # noqa: E731
    return Routing(d(r.logits), d(r.scores), r.indices, d(r.weights), r.shape, r.mask,
                   d(r.load_probs), d(r.noise_std))
