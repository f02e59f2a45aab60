"""Hugging Face transformers integration: new router gradients for pretrained MoE models.

    import moegrad.hf
    model = AutoModelForCausalLM.from_pretrained(...)
    moegrad.hf.patch(model, estimator="dense", losses={"switch": 1e-2})  # in place; returns it
    out = model(input_ids, labels=labels)            # same forward as before (topk/dense/...)
    out.loss.backward()                              # LM loss + moegrad's balance losses
    moegrad.hf.unpatch(model)                        # original forward back

    # DeepSeek-V3: train e_score_correction_bias (HF keeps it frozen) after each optimizer step
    balancer = moegrad.BiasBalancer(model, gamma=1e-3)  # a patched DeepSeek-V3 model
    ...; optimizer.step(); balancer.step()

Shapes: B batch, S sequence, T = B*S tokens, D hidden size, H expert intermediate size,
E routed experts, K experts per token, M = T*K routed rows.

Every supported sparse MoE block keeps its modules and parameters; only its ``forward`` is
replaced, and one helper module ``moegrad_router`` (a :class:`moegrad.Router` subclass with no
persistent state: ``state_dict`` keys are unchanged, except ``noisy_topk``'s learned noise
weight ``...moegrad_router.estimator.w_noise``) is attached to the block. The patched forward:

    z = gate(x)[0]                    [T, E]  the HF gate module is still called (its hooks and
                                              ``output_router_logits`` recording keep working;
                                              PhiMoE's gate, which would draw its own SparseMixer
                                              sample, is given a forward computing x W^T only)
    s = softmax(z) | sigmoid(z)       [T, E]  fp32, as the HF family does
    S, w = estimator.route(...)       [T, K]  with the family's selection (DeepSeek-V3:
                                              group-limited top-k on s + e_score_correction_bias)
                                              and weights (renormalise if the family does,
                                              DeepSeek-V3: / (sum + 1e-20) * routed_scaling_factor)
    y = combine(experts(dispatch(x)))  [T, D] moegrad's sorted dispatch + grouped SwiGLU over
                                              the HF expert weights (gate_up_proj [E, 2H, D] is
                                              read as w1 = gate rows, w3 = up rows; down_proj
                                              [E, D, H] as w2)
    y = estimator.mix(y, ...)                 dense / default_moe router-gradient hooks
    y += shared experts                       Qwen2-MoE: sigmoid(shared_expert_gate(x)) *
                                              shared_expert(x); DeepSeek-V3: shared_experts(x)

Families (see :data:`FAMILIES`): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS (its own
expert layout with biases and clamped GLU, computed per expert), DeepSeek-V3 (sampling
estimators cannot honour its group-limited, biased top-k and are refused there, opt-in or not),
and PhiMoE, whose router is SparseMixer (``jitter_eps`` defaults to the config's
``router_jitter_noise``). PhiMoE's HF gate module samples SparseMixer itself; patched, its
forward returns ``(x W^T, None, None)`` (:func:`_gate_logits`), so one SparseMixer sample per
block and forward is drawn (moegrad's), and its input jitter (``input_jitter_noise``, training)
is applied by the patched block, in HF's order, after the block's own.

The loss (Trainer, Accelerate, TRL, PEFT: any loop that trains on ``outputs.loss``): the
innermost module taking ``labels`` that holds patched blocks (``XForCausalLM``) has its forward
wrapped too. With ``labels`` and ``patch(..., losses=...)``, ``outputs.loss`` = the task loss +
A and ``outputs.aux_loss`` = A, A = the sum over blocks of the weighted moegrad losses (the value
:func:`aux_loss` gives; it is consumed, so :func:`aux_loss` then returns 0 with a warning
instead of counting it twice). Exactly one balance loss reaches ``outputs.loss``: moegrad's when
``losses=`` is given (the family's own ``router_aux_loss_coef * load_balancing_loss`` is then
left out, even with ``output_router_logits=True``, which still returns ``router_logits``), the
family's own otherwise; a training forward with labels that adds neither warns. Without labels
nothing is added: ``loss = my_loss(out.logits) + moegrad.hf.aux_loss(model)``. Like the
family's own, A is added at full weight on every forward: with gradient accumulation over M
micro-batches (the Trainer then does not divide ``outputs.loss`` by M) divide the coefficients
by M to keep the per-step weight.

Forward policy: ``patch`` keeps what a loaded model computes. An estimator whose eval-mode
forward differs from the family's own routing raises a ValueError that names the estimator, the
family and the reason, unless ``patch(..., allow_forward_change=True)`` (e.g. training from
random init). The rule, per block (s scores, S the top-k, c = routed_scaling_factor), checked
against the logits for every family in tests/test_hf.py:

    keep                    topk, dense, default_moe (any family but PhiMoE)
    keep if softmax         gumbel with tau=1, hard=False (eval weights softmax(z)_S = s_S)
    keep if renormalised    noisy_topk (eval weights softmax(z_S) = s_S / sum_S s): Mixtral,
                            GPT-OSS, norm_topk_prob=True; sigmoid scores only with K=1
    keep if K=1 and         straight_through, gumbel (any tau, hard), unweighted (if c=1):
      renormalised          the family's weight is then the constant c
    change                  otherwise: unit weights (unweighted, straight_through, gumbel
                            hard=True), gumbel tau!=1, noisy_topk without renormalisation,
                            sparsemixer (masked-softmax weights; equal only for tokens whose
                            mask leaves one candidate), default_moe forward_defaults=True
                            (adds sum_{i not in S} s_i ebar_i)
    PhiMoE                  keep only sparsemixer with jitter_eps = router_jitter_noise

Sampling estimators (gumbel, noisy_topk, sparsemixer) draw their selection at random in
training mode only, as Mixtral's input jitter and PhiMoE's own SparseMixer do: that randomness
is the method, not a change of the model, so they follow the same rule, judged on the eval-mode
forward (noise off), which equals the family's exactly where the table says so.

Caveats:

* HF's own aux loss (``output_router_logits=True``, ``router_aux_loss_coef``) is computed by
  transformers from the recorded gate logits with a clean top-k: with a sampling estimator it
  counts the clean top-k experts, not the sampled experts the tokens were sent to. moegrad's
  ``losses=`` use the experts actually chosen.
* A patched model deep-copies and pickles (``pickle``, ``torch.save(model)``) as a patched
  model bound to its own modules; :func:`unpatch` works on the copy. (transformers' own
  ``output_router_logits`` recording hooks are local functions: once a model has run with
  them, no pickle of it works, patched or not.)
* Estimator state is not saved: ``default_moe``'s EMA buffers (``defaults``, ``seen``) and
  ``load_counts`` are non-persistent, so after ``save_pretrained`` / ``from_pretrained`` and a
  new ``patch`` they start from zero (the first training forward fills them again).
* Activation (gradient) checkpointing re-runs the block forward in backward. The patched block
  detects that recomputation (a forward running inside autograd's backward pass, which is how
  both reentrant and non-reentrant ``torch.utils.checkpoint`` recompute) and skips its side
  effects there: ``load_counts``, ``default_moe``'s EMA and ``last_routing`` /
  ``last_aux_loss`` are updated once per training forward, as without checkpointing, and the
  recomputed output (and so the gradient) is the forward's. Sampling estimators draw from the
  global RNG, which checkpointing saves and restores, so the recomputation repeats the same
  samples. A ``generator=`` option is not restored by checkpointing: with checkpointing that
  combination is refused (ValueError from ``patch`` when the model already checkpoints,
  RuntimeError from backward when checkpointing was enabled after ``patch``). Reentrant
  checkpointing (``use_reentrant=True``) runs the forward under no_grad, so moegrad losses read
  from it carry no gradient: :func:`aux_loss` refuses them (non-reentrant, transformers'
  default, works; HF's own aux loss has the same limitation under reentrant checkpointing).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moegrad import experts as _experts
from moegrad._checks import check_bool
from moegrad._interfaces import ExpertWeights
from moegrad._spec import check_losses
from moegrad.estimators import available as available_estimators
from moegrad.estimators import build_estimator, get as get_estimator
from moegrad.layer import run_experts
from moegrad.losses import balance_losses
from moegrad.routing import (Router, RouterConfig, Routing, flatten_mask, flatten_tokens,
                             recomputing_in_backward, recomputing_training_forward)

#: expert compute choices: None (= "auto") or a :data:`moegrad.experts.IMPLS` name run moegrad's
#: grouped expert compute; "hf" calls the block's own experts module (so transformers'
#: ``experts_implementation`` applies)
IMPLS = (None, "hf") + tuple(getattr(_experts, "IMPLS", ("auto", "loop")))


@dataclass(frozen=True)
class Family:
    """How one transformers MoE block routes. ``module``/``block`` name the HF block class."""

    name: str
    module: str
    block: str
    score: str  # "softmax" or "sigmoid"
    gate: str = "gate"  # attribute of the block holding the router module (weight [E, D])
    shared: Optional[str] = None  # None, "gated" (Qwen2-MoE) or "plain" (DeepSeek-V3)
    jitter: Optional[str] = None  # block attribute of a multiplicative input jitter (training)
    #: the HF gate module samples its own routing (PhiMoE's SparseMixer): patch gives it a
    #: logits-only forward, so only moegrad draws
    gate_samples: bool = False
    #: gate attribute of a second input jitter the HF gate applies in place (PhiMoE)
    gate_jitter: Optional[str] = None
    correction_bias: bool = False  # DeepSeek-V3's e_score_correction_bias + group-limited top-k
    #: the only estimators that keep this family's forward (None: any)
    estimators: Optional[tuple] = None
    #: expert layout: "fused" (gate_up_proj [E, 2H, D] = [gate; up], SwiGLU) or "gpt_oss"
    #: (gate_up_proj [E, D, 2H] interleaved, biases, clamped GLU)
    experts: str = "fused"
    #: the block returns (hidden_states, combine weights [T, K]) (GPT-OSS)
    returns_weights: bool = False

    def block_class(self):
        """The HF block class, or None if its module is not loaded (then no model holds one)."""
        module = sys.modules.get(self.module)
        return getattr(module, self.block, None) if module is not None else None

    def router_config(self, block: nn.Module) -> RouterConfig:
        """The :class:`RouterConfig` equal to the HF gate's routing rule."""
        gate, experts = getattr(block, self.gate), block.experts
        dim, num_experts = gate.weight.shape[1], gate.weight.shape[0]
        if experts.gate_up_proj.shape[0] != num_experts or experts.down_proj.shape[0] != num_experts:
            raise ValueError(f"{type(block).__name__}: gate has {num_experts} experts but experts "
                             f"hold {experts.gate_up_proj.shape[0]}")
        top_k, normalize, scale, groups = int(gate.top_k), False, 1.0, (None, None)
        if self.name in ("mixtral", "gpt_oss"):  # GPT-OSS: softmax of the K top logits, the same
            normalize = True
        elif self.name == "phimoe":
            top_k = 2  # transformers' PhiMoE sparsemixer always makes two picks
        elif self.correction_bias:
            normalize, scale = bool(gate.norm_topk_prob), float(gate.routed_scaling_factor)
            groups = (int(gate.num_group), int(gate.topk_group))
        else:
            normalize = bool(gate.norm_topk_prob)
        return RouterConfig(dim, num_experts, top_k, score=self.score, normalize=normalize,
                            routed_scaling_factor=scale, n_group=groups[0], topk_group=groups[1],
                            selection_bias=self.correction_bias, check_finite=False)

    def default_options(self, block: nn.Module, estimator: str) -> dict:
        """Estimator options taken from the HF config (PhiMoE: jitter_eps)."""
        if self.name == "phimoe" and estimator == "sparsemixer":
            return {"jitter_eps": float(getattr(block, self.gate).router_jitter_noise)}
        return {}


_M = "transformers.models.{0}.modeling_{0}"
#: supported families by name
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("mixtral", _M.format("mixtral"), "MixtralSparseMoeBlock", "softmax", jitter="jitter_noise"),
    Family("qwen2_moe", _M.format("qwen2_moe"), "Qwen2MoeSparseMoeBlock", "softmax", shared="gated"),
    Family("qwen3_moe", _M.format("qwen3_moe"), "Qwen3MoeSparseMoeBlock", "softmax"),
    Family("olmoe", _M.format("olmoe"), "OlmoeSparseMoeBlock", "softmax"),
    Family("deepseek_v3", _M.format("deepseek_v3"), "DeepseekV3MoE", "sigmoid", shared="plain",
           correction_bias=True),
    Family("phimoe", _M.format("phimoe"), "PhimoeSparseMoeBlock", "softmax", gate="router",
           jitter="input_jitter_noise", estimators=("sparsemixer",), gate_samples=True,
           gate_jitter="input_jitter_noise"),
    Family("gpt_oss", _M.format("gpt_oss"), "GptOssMLP", "softmax", gate="router",
           experts="gpt_oss", returns_weights=True),
)}


def supported() -> list[str]:
    """'family (BlockClass)' for every supported family."""
    return [f"{f.name} ({f.block})" for f in FAMILIES.values()]


# ----------------------------------------------------------------------------- expert compute
def _expert_loop(rows: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor,
                 act: Callable) -> Tensor:
    """Fallback grouped SwiGLU: rows [M, D] grouped by expert, counts [E] -> [M, D].

    gate_up [E, 2H, D] (gate rows first, then up rows, as HF stores them), down [E, D, H]:
    E_e(x) = down_e (act(gate_e x) * (up_e x)). Weight views are taken once with unbind(0) so
    backward accumulates one stacked gradient.
    """
    if rows.shape[0] == 0:
        return rows.new_zeros(0, down.shape[1])
    gate_ups, downs = gate_up.unbind(0), down.unbind(0)
    outs = []
    for e, chunk in enumerate(rows.split(counts.tolist())):
        if chunk.shape[0]:
            g, u = F.linear(chunk, gate_ups[e]).chunk(2, dim=-1)
            outs.append(F.linear(act(g) * u, downs[e]))
    return torch.cat(outs)


def _is_silu(act: Callable) -> bool:
    """True when ``act`` computes silu (transformers' SiLUActivation, nn.SiLU, F.silu, ...)."""
    if isinstance(act, nn.SiLU) or act is F.silu:
        return True
    probe = torch.linspace(-8.0, 8.0, 129)
    try:
        with torch.no_grad():
            return bool(torch.allclose(act(probe), F.silu(probe), rtol=1e-6, atol=1e-7))
    except Exception:  # an activation that cannot run on a CPU probe: use the generic loop
        return False


class HFExperts:
    """A view of an HF experts module with the interface moegrad's estimators use.

    ``stacked_weights()`` -> :class:`~moegrad._interfaces.ExpertWeights` (gate [E, H, D],
    down [E, D, H], up [E, H, D]), views of ``gate_up_proj`` / ``down_proj`` (no copies);
    ``every_expert(x [t, D], weights)`` -> [t, E, D]; ``forward(rows [M, D], counts [E])`` ->
    [M, D]. Holds no state of its own.
    """

    def __init__(self, module: nn.Module, impl: Optional[str]) -> None:
        self.module = module
        self.impl = "auto" if impl is None else impl
        self.num_experts, two_h, self.dim = module.gate_up_proj.shape
        self.hidden_dim = two_h // 2
        self.act = module.act_fn
        self.silu = _is_silu(self.act)

    def stacked_weights(self) -> ExpertWeights:
        """unbind of a [E, 2, H, D] view rather than two slices: backward stacks the two
        gradients into one [E, 2H, D] tensor instead of zero-filling one per slice."""
        gu = self.module.gate_up_proj
        gate, up = gu.view(self.num_experts, 2, self.hidden_dim, self.dim).unbind(1)
        return ExpertWeights(gate=gate, down=self.module.down_proj, up=up)

    @property
    def unselected_inner_products(self) -> Optional[Callable]:
        """For SiLU (SwiGLU) experts, the ``dense`` estimator's fast path
        (:func:`moegrad.experts.unselected_inner_products`: only the unselected pairs, grouped by
        expert); None for other activations, which then go through :meth:`every_expert`."""
        if not self.silu:
            return None
        impl = "auto" if self.impl == "hf" else self.impl

        def inner(x: Tensor, grad_y: Tensor, indices: Tensor, weights: ExpertWeights) -> Tensor:
            return _experts.unselected_inner_products(x, grad_y, indices, weights, impl)
        return inner

    def every_expert(self, x: Tensor, weights: ExpertWeights) -> Tensor:
        gate_x = torch.einsum("td,ehd->teh", x, weights.gate)
        up_x = torch.einsum("td,ehd->teh", x, weights.up)
        return torch.einsum("teh,edh->ted", self.act(gate_x) * up_x, weights.down)

    def __call__(self, rows: Tensor, counts: Tensor) -> Tensor:
        grouped = getattr(_experts, "grouped_mlp", None)
        if grouped is not None and self.silu:  # otherwise the HF activation in a loop
            gate, down, up = self.stacked_weights()
            return grouped(rows, counts, gate, down, up, activation="swiglu", impl=self.impl)
        return _expert_loop(rows, counts, self.module.gate_up_proj, self.module.down_proj, self.act)


class GptOssWeights(NamedTuple):
    """GPT-OSS's stacked expert weights: gate_up [E, D, 2H] (gate = even, up = odd columns),
    gate_up_bias [E, 2H], down [E, H, D], down_bias [E, D]."""

    gate_up: Tensor
    gate_up_bias: Tensor
    down: Tensor
    down_bias: Tensor


class GptOssExpertsView:
    """:class:`HFExperts` for GPT-OSS: gate_up_proj [E, D, 2H] (gate = even, up = odd columns),
    gate_up_proj_bias [E, 2H], down_proj [E, H, D], down_proj_bias [E, D];
    E_e(x) = (HF ``_apply_gate``(x gate_up_e + b_e)) down_e + c_e, where the gate is
    (clamp(up, -l, l) + 1) * g sigmoid(alpha g), g = clamp(gate, max=l). The expert compute is
    a per-expert loop (moegrad's grouped_mlp has no biases or clamped GLU); ``impl="hf"`` uses
    transformers' grouped_mm instead.
    """

    def __init__(self, module: nn.Module, impl: Optional[str]) -> None:
        self.module = module
        self.impl = impl
        self.num_experts, self.dim, two_h = module.gate_up_proj.shape
        self.hidden_dim = two_h // 2
        self.silu = False

    def stacked_weights(self) -> GptOssWeights:
        m = self.module
        return GptOssWeights(m.gate_up_proj, m.gate_up_proj_bias, m.down_proj, m.down_proj_bias)

    def every_expert(self, x: Tensor, weights: GptOssWeights) -> Tensor:
        h = self.module._apply_gate(torch.einsum("td,edh->teh", x, weights.gate_up) + weights.gate_up_bias)
        return torch.einsum("teh,ehd->ted", h, weights.down) + weights.down_bias  # h: [t, E, H]

    def __call__(self, rows: Tensor, counts: Tensor) -> Tensor:
        if rows.shape[0] == 0:
            return rows.new_zeros(0, self.dim)
        gus, gubs, dns, dnbs = (w.unbind(0) for w in self.stacked_weights())
        outs = []
        for e, chunk in enumerate(rows.split(counts.tolist())):
            if chunk.shape[0]:
                h = self.module._apply_gate(chunk @ gus[e] + gubs[e])
                outs.append(h @ dns[e] + dnbs[e])
        return torch.cat(outs)


# ----------------------------------------------------------------------------- the router view
class HFRouter(Router):
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
    ``aux_loss_in_outputs`` True). The HF block is not
    given the attention mask, so padding tokens count in these losses (as in HF's own aux loss
    without ``attention_mask``).
    """

    def __init__(self, block: nn.Module, family: Family, estimator: str, losses: dict,
                 impl: Optional[str], options: dict) -> None:
        nn.Module.__init__(self)
        self.family = family
        self.config = family.router_config(block)
        object.__setattr__(self, "_hf_gate", getattr(block, family.gate))  # not a submodule
        view = GptOssExpertsView if family.experts == "gpt_oss" else HFExperts
        object.__setattr__(self, "hf_experts", view(block.experts, impl))
        self.impl = impl
        self.losses = losses
        self.register_buffer("load_counts", torch.zeros(self.config.num_experts, dtype=torch.int64,
                                                        device=self._hf_gate.weight.device),
                             persistent=False)
        self.estimator = build_estimator(estimator, self.config, **options)
        self.estimator.to(self._hf_gate.weight.device)
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
        """The HF gate module (its ``weight`` [E, D] is the router weight)."""
        return self._hf_gate

    @property
    def bias(self) -> Optional[Tensor]:
        """[E] selection-only bias: DeepSeek-V3's ``e_score_correction_bias``, else None."""
        return self._hf_gate.e_score_correction_bias if self.family.correction_bias else None

    @bias.setter
    def bias(self, value: Tensor) -> None:
        current = self.bias
        if current is None:
            raise ValueError(f"the {self.family.name} router has no selection bias to set")
        if value is not current:
            with torch.no_grad():
                current.copy_(value)

    def __setattr__(self, name: str, value) -> None:
        if name == "bias":  # the HF buffer is an nn.Buffer: keep nn.Module from re-registering it
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return f"family={self.family.name}, {super().extra_repr()}, impl={self.impl}, losses={self.losses}"

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
        recomputing = recomputing_training_forward(self)
        logits = self._hf_gate(flat)[0]
        z = logits.float()
        scores = torch.sigmoid(z) if self.config.score == "sigmoid" else torch.softmax(z, dim=-1)
        picked = self.estimator.route(flat.float(), z, scores, self.selection())
        if self.training and not recomputing and picked.indices.numel():
            rows = picked.indices if token_mask is None else picked.indices[token_mask]
            self.load_counts += torch.bincount(rows.reshape(-1), minlength=self.config.num_experts)
        return Routing(logits=z, scores=scores, indices=picked.indices, weights=picked.weights,
                       shape=shape, mask=token_mask, load_probs=picked.load_probs,
                       noise_std=picked.noise_std)

    def experts_forward(self, flat: Tensor, routing: Routing) -> Tensor:
        """flat [T, D] -> [T, D]: dispatch, experts, combine, estimator hook
        (:func:`moegrad.layer.run_experts`; ``impl="hf"``: the HF experts module, then the hook)."""
        if self.impl == "hf":
            y = self.hf_experts.module(flat, routing.indices, routing.weights.to(flat.dtype))
            return self.estimator.mix(y, flat, routing, self.hf_experts)
        return run_experts(flat, routing, self.hf_experts, self.estimator, training=self.training)[0]


# ----------------------------------------------------------------------------- patched forward
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
    # forward (so the losses are computed again) but keeps the forward's stored values
    keep = not (self.training and recomputing_in_backward())
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
    call = inner if inner is not None else type(self).forward.__get__(self)
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


def _detached(r: Routing) -> Routing:
    """A copy of ``r`` without autograd history (kept on the router for inspection)."""
    d = lambda t: t.detach() if t is not None else None  # noqa: E731
    return Routing(d(r.logits), d(r.scores), r.indices, d(r.weights), r.shape, r.mask,
                   d(r.load_probs), d(r.noise_std))


def _family_of(block: nn.Module) -> Optional[Family]:
    for family in FAMILIES.values():
        cls = family.block_class()
        if cls is not None and isinstance(block, cls):
            return family
    return None


def _check_sampling(family: Family, estimator: str, model_name: str) -> None:
    """A sampling estimator cannot honour DeepSeek-V3's group-limited, biased top-k."""
    if family.correction_bias and get_estimator(estimator).samples:
        allowed = [n for n in available_estimators() if not get_estimator(n).samples]
        raise ValueError(
            f"estimator={estimator!r} samples its expert selection, which cannot honour "
            f"{family.name}'s group-limited top-k and e_score_correction_bias in {model_name}; "
            f"use a deterministic estimator: {allowed}")


def _forward_change(family: Family, config: RouterConfig, estimator,
                    default: dict) -> Optional[str]:
    """Why the built ``estimator`` gives another eval-mode forward than ``family``'s own routing
    under ``config`` (None: the same). ``default``: the family's default options (PhiMoE's
    jitter_eps). The rule is the table of the module docstring."""
    name = estimator.name
    if family.estimators is not None:  # PhiMoE: SparseMixer at the config's jitter
        if name not in family.estimators:
            return (f"{family.name} routes with SparseMixer (a masked softmax per pick, two "
                    f"picks), which only {list(family.estimators)} reproduces")
        for key, value in default.items():  # jitter_eps from the config's router_jitter_noise
            if getattr(estimator, key) != value:
                return (f"{key}={getattr(estimator, key)!r} differs from the config's "
                        f"router_jitter_noise={value!r}, which sets the SparseMixer mask")
        return None
    # K=1 with renormalised weights: every family weight is the constant c, only S matters
    top1 = config.normalize and config.top_k == 1
    unit = "it mixes the selected experts with unit weights, not the gate's scores"
    if name in ("topk", "dense"):
        return None
    if name == "default_moe":
        return ("forward_defaults=True adds sum_{i not in S} s_i * ebar_i to the output"
                if estimator.forward_defaults else None)
    if name == "unweighted":
        return None if top1 and config.routed_scaling_factor == 1.0 else unit
    if name == "straight_through":
        return None if top1 else unit
    if name == "gumbel":
        if top1:
            return None
        if estimator.hard:
            return "hard=True: " + unit
        if config.score != "softmax":
            return f"its weights are softmax(z / tau), not the family's {config.score} scores"
        if estimator.tau != 1.0:
            return f"its weights are softmax(z / tau) with tau={estimator.tau}, not softmax(z)"
        return None
    if name == "noisy_topk":
        if config.normalize and (config.score == "softmax" or config.top_k == 1):
            return None
        how = "renormalised" if config.normalize else "not renormalised"
        return (f"its weights are a softmax over the K kept logits, while {family.name} uses "
                f"{config.score} scores, {how} over the top-k")
    if name == "sparsemixer":
        return ("its weight for each pick is a softmax over the experts left by its mask, not "
                "the family's score")
    return "moegrad.hf does not know whether it keeps the family's forward"


def _keeping(family: Family, block: nn.Module, config: RouterConfig) -> list[str]:
    """The estimator names that keep ``family``'s forward with their default options."""
    keep = []
    for name in available_estimators():
        if family.correction_bias and get_estimator(name).samples:
            continue
        default = family.default_options(block, name)
        with warnings.catch_warnings():  # probes for the error message, not the user's choice
            warnings.simplefilter("ignore", UserWarning)
            built = build_estimator(name, config, **default)
        if _forward_change(family, config, built, default) is None:
            keep.append(name)
    return keep


def _checkpointing(model: nn.Module) -> bool:
    """True when a module of ``model`` has transformers' gradient checkpointing switched on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def patch(model: nn.Module, estimator: str = "topk", losses: Optional[dict] = None,
          impl: Optional[str] = None, *, allow_forward_change: bool = False,
          **estimator_options) -> nn.Module:
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
        allow_forward_change: accept an estimator whose eval-mode forward differs from the
            family's (see the module docstring); default False refuses it.

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
                        {**f.default_options(m, estimator), **estimator_options}) for m, f in blocks]
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


def routers(model: nn.Module) -> list[HFRouter]:
    """The :class:`HFRouter` of every patched block, in module order."""
    return [m for m in model.modules() if isinstance(m, HFRouter)]


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
                and router.training and router.gate.weight.requires_grad):
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


__all__ = ["patch", "unpatch", "routers", "aux_loss", "supported", "FAMILIES", "Family", "HFRouter",
           "HFExperts", "IMPLS"]
