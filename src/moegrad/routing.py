"""The router: gate logits -> scores -> top-k selection -> combine weights.

Shapes: T tokens, D model dim, E experts, K top-k.

    z = x W_g^T                 [T, E]  fp32 gate logits (``Routing.logits``; fp64 for fp64 x)
    s = score(z / temperature)  [T, E]  softmax or sigmoid (``Routing.scores``; ReLU gates
                                        with ``routing="remoe"``, :mod:`moegrad.remoe`)
    S = TopK(s + b)             [T, K]  selection; b is the optional selection-only bias and
                                        group-limited top-k may mask whole expert groups first
    w_i = c * s_i / (sum_S s)   [T, K]  (``normalize=True``; c = routed_scaling_factor)

How S and w are formed and how the router gradient flows is the estimator's business
(:mod:`moegrad.estimators`); the shared selection and weighting rules are
:class:`~moegrad.selection.Selection`, which the router builds per call (config + bias) and
passes to ``estimator.route(x, z, scores, selection)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moegrad._spec import (PAIR_ROUTINGS, SCORES, RouterConfig, RouterViews, nonfinite_logits_message,
                           nonfinite_tempered_message, resolve_estimator)
from moegrad.dispatch import count_ids
from moegrad.estimators import build_estimator
from moegrad.selection import Selection, remoe_active

__all__ = ["SCORES", "RouterConfig", "Routing", "Router", "flatten_tokens", "flatten_mask",
           "recomputing_in_backward", "recomputing_training_forward", "recomputing_training_forward_unless_compiled",
           "pair_counts", "add_load_counts", "update_running_state", "is_router"]


@dataclass
class Routing:
    """What a router decided for T tokens.

    logits [T, E] fp32 gate logits; scores [T, E] fp32 softmax/sigmoid of logits/temperature
    (the ReLU gates ReLU(logits/temperature) with ``routing="remoe"``);
    indices [T, K] int64 selected experts; weights [T, K] fp32 combine weights (differentiable
    as the estimator defines). (fp64 inputs are routed in fp64, for gradient checks.) ``shape``
    is the leading shape of the input ((T,) or (B, S)).
    ``mask`` [T] bool marks real (non-padding) tokens, None when every token is real.
    ``load_probs`` [T, E] is the smooth load P(x, i) of ``noisy_topk`` (None otherwise) and
    ``noise_std`` [T, E] its noise scale.
    ``chosen`` [T, E] bool: with ``routing="expert_choice"`` or ``"remoe"`` only (else None),
    which pairs are real: indices is then every expert [T, E] (indices[t, j] = j), weights
    [T, E] are r * s * chosen, and only the pairs with chosen True are dispatched (padding never
    is); under ReMoE chosen = (s > 0) on real tokens.
    Code reading ``indices`` as "the experts of token t" must read ``chosen`` too.
    """

    logits: Tensor
    scores: Tensor
    indices: Tensor
    weights: Tensor
    shape: tuple
    mask: Optional[Tensor] = None
    load_probs: Optional[Tensor] = None
    noise_std: Optional[Tensor] = None
    chosen: Optional[Tensor] = None

    @property
    def num_tokens(self) -> int:
        return self.logits.shape[0]


def flatten_tokens(x: Tensor, dim: int, name: str = "x") -> Tensor:
    """[T, D] or [B, S, D] -> [T, D] (a view), validating dtype and feature size."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape [T, D] or [B, S, D], got {tuple(x.shape)}")
    if x.shape[-1] != dim:
        raise ValueError(f"{name} has feature size {x.shape[-1]} but the module was built with dim={dim}")
    return x.reshape(-1, dim)


def flatten_mask(mask: Optional[Tensor], shape: tuple) -> Optional[Tensor]:
    """Padding mask of the input's leading shape -> [T] bool (True = real token)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor of shape {tuple(shape)}, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; it must match the input's leading "
                         f"shape {tuple(shape)} (True marks real tokens, False padding)")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be bool (or integer 0/1): True/1 marks real tokens")
        mask = mask.bool()
    return mask.reshape(-1)


_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def recomputing_in_backward() -> bool:
    """True while autograd runs a backward pass. A layer forward then is activation
    checkpointing's recomputation (reentrant and non-reentrant ``torch.utils.checkpoint`` both
    re-run the forward inside backward): it must compute the same values but must not update
    running state (load counts, EMA defaults, balance windows) a second time."""
    return _graph_task_id is not None and _graph_task_id() != -1


@torch.library.custom_op("moegrad::unless_recomputing", mutates_args=())
def unless_recomputing(value: Tensor, neutral: float) -> Tensor:
    """A copy of value, or ``neutral`` everywhere while :func:`recomputing_in_backward`: a
    custom op, so under torch.compile the test runs at run time (no graph break). Running
    state is then updated with the result (counts [E] with neutral 0, a factor with 1)."""
    return torch.full_like(value, neutral) if recomputing_in_backward() else value.clone()


@unless_recomputing.register_fake
def _(value, neutral):
    return torch.empty_like(value)


def recomputing_training_forward(router: "Router") -> bool:
    """True for a training-mode router forward re-run by activation checkpointing. Raises if the
    estimator samples from its own ``generator``: checkpointing restores the global RNG only,
    so the recomputation would draw other samples than the forward and the gradient would be
    wrong."""
    if not (router.training and recomputing_in_backward()):
        return False
    if getattr(router.estimator, "generator", None) is not None:
        raise RuntimeError(
            f"estimator={router.estimator.name!r} with generator= cannot run under activation "
            "checkpointing: the recomputation in backward would draw new samples from the "
            "generator (checkpointing restores the global RNG only); drop generator= (seed "
            "with torch.manual_seed) or disable checkpointing")
    return True


def recomputing_training_forward_unless_compiled(router: "Router") -> bool:
    """:func:`recomputing_training_forward`, or False under torch.compile (no graph break;
    an estimator with a ``generator`` still gets the eager test): running state is then
    updated through :func:`update_running_state`, which skips the recomputation at run time."""
    if torch.compiler.is_compiling() and getattr(router.estimator, "generator", None) is None:
        return False
    return recomputing_training_forward(router)


def pair_counts(indices: Tensor, token_mask: Optional[Tensor], num_experts: int) -> Tensor:
    """[E] int64: the (token, slot) pairs of indices [T, K] per expert, padding (token_mask [T]
    False) left out. Static shapes (torch.compile): padding pairs are counted as an extra id E,
    then dropped."""
    ids = indices if token_mask is None else indices.masked_fill(~token_mask[:, None], num_experts)
    return count_ids(ids.reshape(-1), num_experts + 1)[:num_experts]


def add_load_counts(load_counts: Tensor, indices: Tensor, token_mask: Optional[Tensor]) -> None:
    """load_counts [E] += :func:`pair_counts`, unless this is checkpointing's recomputation
    (:func:`update_running_state`)."""
    update_running_state(load_counts, pair_counts(indices, token_mask, load_counts.shape[0]))


def _check_finite_logits(logits: Tensor, z: Tensor, temperature: float) -> None:
    """Raise if the [T, E] logits, or the tempered logits z = logits / temperature, hold NaN/Inf
    (under torch.compile through the custom op below: the same check and error inside the
    graph, no graph break)."""
    if torch.compiler.is_compiling():
        torch.ops.moegrad.check_finite_logits(logits.detach(), z.detach(), temperature)
        return
    if not logits.numel() or bool(torch.isfinite(z).all()):
        return
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).any(-1).sum())
        raise ValueError(nonfinite_logits_message(bad, logits.shape[0]))
    bad = int((~torch.isfinite(z)).any(-1).sum())
    raise ValueError(nonfinite_tempered_message(temperature, bad, logits.shape[0]))


@torch.library.custom_op("moegrad::check_finite_logits", mutates_args=())
def _check_finite_logits_op(logits: Tensor, z: Tensor, temperature: float) -> None:
    _check_finite_logits(logits, z, temperature)


@_check_finite_logits_op.register_fake
def _(logits, z, temperature):
    return None


torch.fx.node.has_side_effect(torch.ops.moegrad.check_finite_logits.default)  # no output, kept


def update_running_state(state: Tensor, value: Tensor, how: str = "add") -> None:
    """state += value (``how="add"``), state *= value (``"mul"``) or state = value (``"copy"``)
    in place, unless this is activation checkpointing's recomputation
    (:func:`recomputing_in_backward`), which must not update running state twice. Under
    torch.compile the test is :func:`unless_recomputing`'s, at run time (no graph break): the
    load counts, ReMoE's lambda."""
    if how not in ("add", "mul", "copy"):
        raise ValueError(f"how={how!r} must be 'add', 'mul' or 'copy'")
    if torch.compiler.is_compiling():
        if how == "copy":
            rerun = unless_recomputing(torch.ones((), device=state.device), 0.0) == 0
            value = torch.where(rerun, state, value)
        else:
            value = unless_recomputing(value, 0.0 if how == "add" else 1.0)
    elif recomputing_in_backward():
        return
    if how == "add":
        state += value
    elif how == "mul":
        state *= value
    else:
        state.copy_(value)


class Router(RouterViews, nn.Module):
    """Top-k router with a pluggable gradient estimator.

    Args:
        dim: model dimension D.  num_experts: E.  top_k: K in 1..E.
        routing: "topk" (default): S = TopK(s + b). "sinkhorn" (Megatron-Core's sinkhorn
            load balancing): in training mode S = TopK of the Sinkhorn-balanced scores
            (:func:`moegrad.selection.sinkhorn`), in eval mode plain top-k; the weights are the
            scores at S as for "topk". It needs an estimator that selects deterministically
            (not gumbel/noisy_topk/sparsemixer) and no ``selection_bias``; group-limited top-k
            then masks groups of the balanced matrix. "expert_choice" (Zhou et al. 2022): each
            expert takes its c = min(ceil(f * T * K / E), T) highest-scoring real tokens
            (f = ``capacity_factor``, 1 if None), the weights are r * s at the chosen pairs
            (``Routing.chosen``), a token gets 0..E experts; the same in train and eval; takes
            estimator="topk" only, no ``normalize``/``selection_bias``/``n_group``; a token's
            experts depend on the other (also future) tokens of the call, so it is not causal
            (:mod:`moegrad.selection`). "remoe" (Wang et al., ICLR 2025): ReLU gates
            g = r * ReLU(z / temperature); token t goes to every expert with g_te > 0, weighted
            by g_te, with plain autograd (no estimator: leave ``estimator`` unset); the layer
            adds an L1 penalty whose coefficient adapts so that the mean number of active
            experts per token tends to ``top_k`` (:mod:`moegrad.remoe`); no ``normalize``,
            ``selection_bias``, ``n_group`` or capacity.
        score: "softmax" or "sigmoid" applied to logits / temperature (None: "softmax"; "relu"
            under ``routing="remoe"``, the only score it takes).
        normalize: renormalise the K selected scores to sum to 1 (estimators that define their
            own weights say so in their docstring).
        estimator: a name from :func:`moegrad.estimators.available` (None: "topk"); extra
            keyword arguments are that estimator's options.
        temperature: divides the logits before scoring.
        routed_scaling_factor: multiplies the combine weights (DeepSeek-V3).
        n_group, topk_group: group-limited top-k (DeepSeek-V3): keep the ``topk_group`` groups
            whose two best (biased) scores sum highest, then take the top-k inside them.
        selection_bias: register a bias buffer ``bias`` [E] added to the scores for selection
            only (auxiliary-loss-free balancing, see :class:`moegrad.BiasBalancer`).
        check_finite: raise if the logits contain NaN/Inf (costs one reduction per call).
        capacity_factor: ``routing="expert_choice"`` only: f in c above (None: 1).
        l1_init, l1_alpha: ``routing="remoe"`` only: the L1 coefficient's starting value
            lambda_0 (None: 1e-8) and its factor per training call alpha > 1 (None: 1.2), the
            paper's values.

    Buffers: ``load_counts`` [E] int64, (token, slot) pairs routed to each expert in training
    mode since the last :meth:`reset_load_counts` (padding tokens excluded);
    ``l1_coefficient`` 0-d fp32 (``routing="remoe"`` only): ReMoE's current lambda (and
    ``l1_previous``, not saved: lambda before the last update, for activation checkpointing).
    """

    #: the expert-parallel process group, set on the instance by
    #: :func:`moegrad.distributed.expert_parallel` (:class:`moegrad.balancing.BiasBalancer` then
    #: all-reduces the loads); None otherwise. A class attribute, so routers that do not run
    #: ``Router.__init__`` (the HF adapter's) have it too.
    process_group = None

    def __init__(self, dim: int, num_experts: int, top_k: int, *, routing: str = "topk",
                 score: Optional[str] = None,
                 normalize: bool = False, estimator: Optional[str] = None, temperature: float = 1.0,
                 routed_scaling_factor: float = 1.0, n_group: Optional[int] = None,
                 topk_group: Optional[int] = None, selection_bias: bool = False,
                 check_finite: bool = True, capacity_factor: Optional[float] = None,
                 l1_init: Optional[float] = None, l1_alpha: Optional[float] = None,
                 **estimator_options) -> None:
        super().__init__()
        self.config = RouterConfig(dim, num_experts, top_k, score, normalize, temperature,
                                   routed_scaling_factor, n_group, topk_group,
                                   selection_bias, check_finite, routing, capacity_factor,
                                   l1_init, l1_alpha)
        estimator = resolve_estimator(estimator, self.config.routing)
        self.gate = nn.Linear(dim, num_experts, bias=False)
        if self.config.selection_bias:
            self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.bias = None
        self.register_buffer("load_counts", torch.zeros(num_experts, dtype=torch.int64))
        if self.config.routing == "remoe":
            self.register_buffer("l1_coefficient", torch.tensor(self.config.l1_init, dtype=torch.float32))
            # lambda before the last update (moegrad.remoe.remoe_penalty: checkpointing's re-run)
            self.register_buffer("l1_previous", torch.tensor(self.config.l1_init, dtype=torch.float32),
                                 persistent=False)
        self.estimator = build_estimator(estimator, self.config, **estimator_options)

    # num_experts, top_k: read-only views of the config (RouterViews)
    def extra_repr(self) -> str:
        return self.config_repr()

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Routing:
        """x: [T, D] or [B, S, D]; mask: optional bool of x's leading shape -> :class:`Routing`."""
        flat = flatten_tokens(x, self.config.dim)
        shape = tuple(x.shape[:-1])
        token_mask = flatten_mask(mask, shape)
        compute = torch.promote_types(flat.dtype, torch.float32)  # fp32, or fp64 for fp64 input
        flat = flat.to(compute)
        with torch.autocast(flat.device.type, enabled=False):  # fp32 routing, even under autocast
            return self._route(flat, shape, token_mask, compute)

    def _route(self, flat: Tensor, shape: tuple, token_mask: Optional[Tensor], compute) -> Routing:
        logits = F.linear(flat, self.gate.weight.to(compute))  # [T, E]
        z = logits / self.config.temperature if self.config.temperature != 1.0 else logits
        if self.config.check_finite:
            _check_finite_logits(logits, z, self.config.temperature)
        scores = self.score(z)
        recomputing = recomputing_training_forward_unless_compiled(self)
        if self.config.routing in PAIR_ROUTINGS:
            return self._route_pairs(logits, scores, shape, token_mask, recomputing)
        picked = self.estimator.route(flat, z, scores, self.selection(token_mask))
        if self.training and picked.indices.numel() and not recomputing:
            add_load_counts(self.load_counts, picked.indices, token_mask)
        return Routing(logits=logits, scores=scores, indices=picked.indices, weights=picked.weights,
                       shape=shape, mask=token_mask, load_probs=picked.load_probs,
                       noise_std=picked.noise_std)

    def _route_pairs(self, logits: Tensor, scores: Tensor, shape: tuple,
                     token_mask: Optional[Tensor], recomputing: bool) -> Routing:
        """Expert choice (every expert takes its top-c real tokens) or ReMoE (every positive
        ReLU gate of a real token): indices [T, E] = every expert, weights = r * s * chosen
        (plain autograd through the scores)."""
        if self.config.routing == "remoe":
            chosen = remoe_active(scores, token_mask)  # [T, E] bool
        else:
            chosen = self.selection(token_mask).select_expert_choice(scores)  # [T, E] bool
        t, e = scores.shape
        indices = torch.arange(e, device=scores.device).expand(t, e)
        weights = scores * chosen.to(scores.dtype)
        if self.config.routed_scaling_factor != 1.0:
            weights = weights * self.config.routed_scaling_factor
        if self.training and t and not recomputing:
            update_running_state(self.load_counts, chosen.sum(0))
        return Routing(logits=logits, scores=scores, indices=indices, weights=weights,
                       shape=shape, mask=token_mask, chosen=chosen)

    # -- shared rules the estimators build on
    def score(self, z: Tensor) -> Tensor:
        """[T, E] tempered logits -> [T, E] scores (ReLU gates under ``routing="remoe"``)."""
        if self.config.score == "relu":
            return torch.relu(z)
        return torch.sigmoid(z) if self.config.score == "sigmoid" else torch.softmax(z, dim=-1)

    def selection(self, mask: Optional[Tensor] = None) -> Selection:
        """This call's :class:`~moegrad.selection.Selection`: the config, the current bias, the
        mode (training or eval) and the call's token mask [T] (None: every token is real)."""
        return Selection(self.config, self.bias, self.training, mask)

    def select_topk(self, scores: Tensor) -> Tensor:
        """[T, E] scores -> [T, K] int64 indices (:meth:`moegrad.selection.Selection.select_topk`)."""
        return self.selection().select_topk(scores)

    def combine_weights(self, scores: Tensor, indices: Tensor) -> Tensor:
        """[T, E] scores, [T, K] indices -> [T, K] weights
        (:meth:`moegrad.selection.Selection.combine_weights`)."""
        return self.selection().combine_weights(scores, indices)

    def reset_load_counts(self) -> Tensor:
        """Return the counts gathered since the last reset and zero them."""
        counts = self.load_counts.clone()
        self.load_counts.zero_()
        return counts

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (behind ``.to``, ``.cuda``, ``.half``, ...) keeping the selection
        bias (and ReMoE's ``l1_coefficient``) fp32: a dtype cast moves it to the new device from
        its exact fp32 value, never through the new dtype (in bf16, BiasBalancer's +1e-3 on 0.5 would round away)."""
        kept = {name: self._buffers.get(name) for name in ("bias", "l1_coefficient", "l1_previous")}
        out = super()._apply(fn, recurse)
        for name, before in kept.items():
            moved = self._buffers.get(name)
            if before is not None and moved is not None and moved.dtype != torch.float32:
                self._buffers[name] = before.to(device=moved.device, dtype=torch.float32)
        return out


def is_router(module: object) -> bool:
    """True for a :class:`Router`, or a module whose class declares the router contract with
    ``router_contract = True`` without subclassing Router (:class:`moegrad.hf.HFRouter`, a view
    over a transformers gate): ``forward(x, mask) -> Routing``, ``config``, ``gate``, ``bias``,
    ``estimator``, ``load_counts``, ``reset_load_counts()``. Code that collects a model's routers
    (BiasBalancer, the diagnostics) uses this rather than ``isinstance(m, Router)``."""
    return isinstance(module, Router) or getattr(type(module), "router_contract", False) is True
