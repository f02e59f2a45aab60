"""The router view: moegrad's routing over an HF MoE block's own gate.

Shapes: T tokens, D hidden size, E routed experts, K experts per token, M = T*K routed rows.

    z = gate(x)[0]              [T, E]  the HF gate module is called (hooks and
                                        ``output_router_logits`` recording keep working)
    s = softmax(z) | sigmoid(z) [T, E]  fp32, as the HF family does
    S, w = estimator.route(...) [T, K]  with the family's selection and weights (:class:`Family`)
    y = combine(experts(dispatch(x)))   [T, D] then ``estimator.mix`` (router-gradient hooks)

:class:`HFRouter` is a module of its own (not a :class:`moegrad.Router` subclass: it owns no
gate parameter) with the router contract: ``config``, ``gate``, ``bias``, ``estimator``,
``load_counts``, ``select_topk``/``combine_weights`` (the Router's rules),
``reset_load_counts()`` and ``forward(x, mask) -> Routing``; :func:`moegrad.routing.is_router`
recognises it, so :class:`moegrad.BiasBalancer` and :mod:`moegrad.diagnostics` find it.

PEFT (docs/hf.md): the gate is called as the block holds it now (a peft ``lora.ParamWrapper``
around it, added before or after :func:`patch`, then applies W + B A), and the expert compute
runs with the ParamWrappers around ``block.experts`` active (W_e + B_e A_e), as their forward
would.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from moegrad._spec import RouterViews
from moegrad.estimators import build_estimator
from moegrad.hf.experts import GptOssExpertsView, HFExperts
from moegrad.hf.families import Family, _unwrap
from moegrad.layer import run_experts
from moegrad.routing import (Router, Routing, add_load_counts, flatten_mask, flatten_tokens,
                             recomputing_training_forward_unless_compiled)

__all__ = ["HFRouter", "routers"]


class HFRouter(RouterViews, nn.Module):
    """moegrad's router view of an HF MoE block (attached as ``block.moegrad_router``).

    It owns no parameters of the HF model and adds no persistent state: the HF gate is read
    through a plain reference, the estimator's buffers (e.g. ``default_moe``'s ``defaults``) and
    ``load_counts`` are non-persistent. ``bias`` is the HF ``e_score_correction_bias`` buffer
    itself for DeepSeek-V3 (None otherwise), so :class:`moegrad.BiasBalancer` trains it in place
    and ``save_pretrained`` saves it under its own name.

    After each forward of the block (not after checkpointing's recomputation in backward):
    ``last_routing`` (:class:`Routing`, detached),
    ``last_aux_loss`` (scalar with gradient, the weighted sum of the configured moegrad losses;
    None when none are configured) and ``last_losses`` ({name: value}); a forward with labels
    adds ``last_aux_loss`` to ``outputs.loss`` and clears it (``last_losses`` kept detached,
    ``aux_loss_in_outputs`` True). The HF block is not given the attention mask, so padding
    tokens count in these losses (as in HF's own aux loss without ``attention_mask``).
    """

    #: routes with the :class:`moegrad.Router` contract (:func:`moegrad.routing.is_router`)
    router_contract = True

    def __init__(self, block: nn.Module, family: Family, estimator: str, losses: dict,
                 impl: Optional[str], options: dict, routing: str = "topk") -> None:
        super().__init__()
        self.family = family
        self.config = family.router_config(block, routing)
        object.__setattr__(self, "_block", block)  # not a submodule
        view = GptOssExpertsView if family.experts == "gpt_oss" else HFExperts
        self.hf_experts = view(_unwrap(block.experts), impl)  # a plain object: no state of its own
        self.impl = impl
        self.losses = losses
        self.register_buffer("load_counts", torch.zeros(self.config.num_experts, dtype=torch.int64,
                                                        device=self.gate.weight.device),
                             persistent=False)
        self.estimator = build_estimator(estimator, self.config, **options)
        self.estimator.to(self.gate.weight.device)
        for module in self.estimator.modules():
            for name, buf in list(module._buffers.items()):
                if buf is not None:
                    module.register_buffer(name, buf, persistent=False)
        self.last_routing: Optional[Routing] = None
        self.last_aux_loss: Optional[Tensor] = None
        self.last_losses: dict = {}
        #: the last forward's ``last_aux_loss`` was added to the model's ``outputs.loss`` (and
        #: cleared): :func:`aux_loss` then returns 0 with a warning instead of counting it twice
        self.aux_loss_in_outputs = False

    @property
    def gate(self) -> nn.Module:
        """The HF gate module (its ``weight`` [E, D] is the router weight), under any PEFT
        wrapper the block holds it in."""
        return _unwrap(getattr(self._block, self.family.gate))

    @property
    def gate_trains(self) -> bool:
        """True when any parameter of the gate as the block holds it (a PEFT wrapper's LoRA
        adapters included) requires a gradient."""
        return any(p.requires_grad for p in getattr(self._block, self.family.gate).parameters())

    @property
    def bias(self) -> Optional[Tensor]:
        """[E] selection-only bias: DeepSeek-V3's ``e_score_correction_bias``, else None."""
        return self.gate.e_score_correction_bias if self.family.correction_bias else None

    @bias.setter
    def bias(self, value: Tensor) -> None:
        current = self.bias
        if current is None:
            raise ValueError(f"the {self.family.name} router has no selection bias to set")
        if value is not current:
            with torch.no_grad():
                current.copy_(value)

    def __setattr__(self, name: str, value) -> None:
        # nn.Module.__setattr__ registers an nn.Buffer value (HF's e_score_correction_bias is one)
        # as a new buffer before looking at the class: send ``bias`` to its property setter
        if name == "bias":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    #: never expert-parallel (read by moegrad.BiasBalancer, as a Router's)
    process_group = None

    # the Router's views and its selection and weighting rules, read from ``config``, ``bias``
    # and ``load_counts`` (the estimators call them on the router they route for)
    selection = Router.selection
    select_topk = Router.select_topk
    combine_weights = Router.combine_weights
    reset_load_counts = Router.reset_load_counts

    def extra_repr(self) -> str:
        return (f"family={self.family.name}, {self.config_repr()}, impl={self.impl}, "
                f"losses={self.losses}")

    def forward(self, x: Tensor, mask: Optional[Tensor] = None,
                shape: Optional[tuple] = None) -> Routing:
        """x [T, D] or [B, S, D]; mask: optional bool of the leading shape (True = real token,
        padding is left out of ``load_counts`` and the balance losses); ``shape``: the leading
        shape when x is already flat (the patched block passes [T, D] and (B, S)).
        -> :class:`Routing` (the :class:`moegrad.Router` contract)."""
        flat = flatten_tokens(x, self.config.dim)
        shape = tuple(shape) if shape is not None else tuple(x.shape[:-1])
        token_mask = flatten_mask(mask, shape)
        # through the HF module, so its hooks and output_router_logits recording fire (PhiMoE's
        # gate then runs :func:`_gate_logits`: no SparseMixer sample of its own)
        recomputing = recomputing_training_forward_unless_compiled(self)
        logits = getattr(self._block, self.family.gate)(flat)[0]  # a PEFT wrapper applies W + B A
        z = logits.float()
        scores = torch.sigmoid(z) if self.config.score == "sigmoid" else torch.softmax(z, dim=-1)
        picked = self.estimator.route(flat.float(), z, scores, self.selection(token_mask))
        if self.training and not recomputing and picked.indices.numel():
            add_load_counts(self.load_counts, picked.indices, token_mask)
        return Routing(logits=z, scores=scores, indices=picked.indices, weights=picked.weights,
                       shape=shape, mask=token_mask, load_probs=picked.load_probs,
                       noise_std=picked.noise_std)

    def experts_forward(self, flat: Tensor, routing: Routing) -> Tensor:
        """flat [T, D] -> [T, D]: dispatch, experts, combine, estimator hook
        (:func:`moegrad.layer.run_experts`; ``impl="hf"``: the HF experts module, then the hook),
        with the LoRA of any peft ParamWrapper around ``block.experts`` applied."""
        with _adapted(self._block.experts):
            if self.impl == "hf":
                y = self.hf_experts.module(flat, routing.indices, routing.weights.to(flat.dtype))
                return self.estimator.mix(y, flat, routing, self.hf_experts)
            return run_experts(flat, routing, self.hf_experts, self.estimator, training=self.training)[0]


@contextmanager
def _adapted(module: nn.Module) -> Iterator[None]:
    """Inside: the parameters of the module under PEFT wrappers read W + B A, as peft's
    ``lora.ParamWrapper.forward`` makes them (``target_parameters``; nested wrappers, one per
    parameter). moegrad's expert compute reads the expert weights directly, not through the
    wrapper's forward. Raises TypeError for another wrapper (it only adapts its own forward)."""
    with ExitStack() as stack:
        while isinstance(getattr(module, "base_layer", None), nn.Module):
            if not hasattr(module, "_activate_lora"):
                raise TypeError(f"the experts are wrapped in {type(module).__name__}, which adapts "
                                "its forward only; moegrad computes the experts from their weights: "
                                "adapt expert weights with peft's target_parameters (lora.ParamWrapper)")
            if not module.disable_adapters and not module.merged:
                stack.enter_context(module._activate_lora(module.active_adapters))
            module = module.base_layer
        yield


def routers(model: nn.Module) -> list[HFRouter]:
    """The :class:`HFRouter` of every patched block, in module order."""
    return [m for m in model.modules() if isinstance(m, HFRouter)]
