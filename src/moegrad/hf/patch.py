"""patch / unpatch: install moegrad's routing in every supported MoE block of a model.

``patch`` keeps each block's modules and parameters, attaches one :class:`HFRouter`
(``block.moegrad_router``, no persistent state but ``noisy_topk``'s ``w_noise``) and replaces
the block's ``forward`` (:func:`moegrad.hf.forward._moe_forward`), PhiMoE's gate forward and the
task model's loss forward (:func:`moegrad.hf.loss._loss_forward`); ``unpatch`` restores them.
What the patched model computes: docs/hf.md.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from moegrad._checks import check_bool
from moegrad._spec import TOKEN_CHOICE_ROUTINGS, check_losses, check_routing
from moegrad.estimators import get as get_estimator
from moegrad.hf.experts import IMPLS
from moegrad.hf.families import _family_of, supported
from moegrad.hf.forward import _bind, _gate_logits, _moe_forward, _unbind
from moegrad.hf.loss import _loss_forward, _loss_modules
from moegrad.hf.policy import _check_sampling, _forward_change, _keeping
from moegrad.hf.router import HFRouter

__all__ = ["patch", "unpatch"]


def _checkpointing(model: nn.Module) -> bool:
    """True when a module of ``model`` has transformers' gradient checkpointing switched on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def patch(model: nn.Module, estimator: str = "topk", losses: Optional[dict] = None,
          impl: Optional[str] = None, *, routing: str = "topk",
          allow_forward_change: bool = False, **estimator_options) -> nn.Module:
    """Patch, in place, every supported sparse MoE block of ``model``; returns ``model``.

    Args:
        model: a transformers model (or any module) holding blocks of :data:`FAMILIES`.
        estimator: a name from :func:`moegrad.estimators.available`; extra keyword arguments
            are its options (e.g. ``beta`` for ``default_moe``).
        losses: optional moegrad balance losses ``{name: coefficient}`` computed per block;
            their sum is added to ``outputs.loss`` (and is ``outputs.aux_loss``) of a forward
            with labels, in place of the family's own ``output_router_logits`` aux loss; after
            a forward without labels read it with :func:`aux_loss`. Default: none (the family's
            own aux loss, if ``output_router_logits``, as before).
        impl: expert compute: None (= "auto") or a :data:`moegrad.experts.IMPLS` name
            (moegrad's grouped compute, :func:`moegrad.experts.grouped_mlp`), or "hf" (the
            block's own experts module and transformers' ``experts_implementation``).
        routing: "topk" (default, the family's rule) or "sinkhorn" (training-mode selection on
            the Sinkhorn-balanced scores, eval unchanged; see :class:`moegrad.Router`; not with
            DeepSeek-V3's selection bias).
        allow_forward_change: accept an estimator whose eval-mode forward differs from the
            family's (see :mod:`moegrad.hf.policy` and docs/hf.md); default False refuses it.

    Raises ValueError when the model has no supported block (naming the model class and the
    supported ones), when it is already patched, when the estimator cannot honour the family's
    routing (a sampling estimator with DeepSeek-V3's group-limited, biased top-k), when it
    would change the forward and ``allow_forward_change`` is False, or when a sampling
    estimator's ``generator`` meets gradient checkpointing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; choose one of {list(IMPLS)}")
    get_estimator(estimator)
    check_routing(routing)
    if routing not in TOKEN_CHOICE_ROUTINGS:
        raise ValueError(f"routing={routing!r} is not supported by moegrad.hf.patch (the HF "
                         "adapter keeps the family's token-choice top-k); choose one of "
                         f"{list(TOKEN_CHOICE_ROUTINGS)}")
    allow_forward_change = check_bool("allow_forward_change", allow_forward_change)
    coefficients = check_losses(losses, estimator)
    name = type(model).__name__
    blocks = [(m, f) for m in model.modules() if (f := _family_of(m)) is not None]
    if not blocks:
        raise ValueError(f"{name} holds no supported sparse MoE block; supported: "
                         f"{', '.join(supported())}")
    if any(hasattr(m, "moegrad_router") for m, _ in blocks):
        raise ValueError(f"{name} is already patched by moegrad.hf.patch; call "
                         "moegrad.hf.unpatch(model) first to patch it again")
    if get_estimator(estimator).observes_outputs and impl == "hf":
        raise ValueError(f"estimator={estimator!r} observes per-expert outputs, which impl='hf' "
                         "does not expose; use impl=None")
    sampler = get_estimator(estimator).samples
    if sampler and estimator_options.get("generator") is not None and _checkpointing(model):
        raise ValueError(
            f"generator={estimator_options['generator']!r} cannot be used on {name}, which has "
            "gradient checkpointing enabled: the recomputation in backward would draw new "
            f"samples for estimator={estimator!r} (checkpointing restores the global RNG only); "
            "drop generator= (seed with torch.manual_seed) or disable checkpointing first")
    for family in {f for _, f in blocks}:
        _check_sampling(family, estimator, name)
        if family.experts != "fused" and impl not in (None, "auto", "loop", "hf"):
            raise ValueError(f"impl={impl!r} is not available for {family.name} experts (biases, "
                             "clamped GLU); use impl=None (a per-expert loop) or 'hf'")
    routers = [HFRouter(m, f, estimator, coefficients, impl,
                        {**f.default_options(m, estimator), **estimator_options}, routing)
               for m, f in blocks]
    if not allow_forward_change:
        for (block, family), router in zip(blocks, routers):
            why = _forward_change(family, router.config, router.estimator,
                                  family.default_options(block, estimator))
            if why is not None:
                keep = _keeping(family, block, router.config)
                raise ValueError(
                    f"estimator={estimator!r} would change the forward of {family.name} in "
                    f"{name}: {why}. Estimators that keep it: {keep}. Pass "
                    "allow_forward_change=True to patch() to accept different outputs (e.g. "
                    "training from random init)")
    for (block, family), router in zip(blocks, routers):
        router.train(block.training)
        block.moegrad_router = router
        _bind(_moe_forward, block)
        if family.gate_samples:
            _bind(_gate_logits, router.gate)
    for module in _loss_modules(model, blocks):
        _bind(_loss_forward, module)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original forward of every block patched by :func:`patch`; returns ``model``.

    Raises ValueError if nothing in ``model`` is patched.
    """
    found = False
    for module in model.modules():
        if "moegrad_router" in module._modules:
            if module.moegrad_router.family.gate_samples:
                _unbind(module.moegrad_router.gate)
            del module.moegrad_router
            if not _unbind(module):  # a forward set over ours after patch: drop it too
                module.__dict__.pop("forward", None)
            found = True
        elif getattr(module.__dict__.get("forward"), "__func__", None) is _loss_forward:
            _unbind(module)
    if not found:
        raise ValueError(f"{type(model).__name__} is not patched by moegrad.hf.patch")
    return model
