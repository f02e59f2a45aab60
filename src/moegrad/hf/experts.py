"""Expert adapters: HF expert weights seen through the interface moegrad's estimators use.

Shapes: M routed rows, t tokens, D hidden size, H expert intermediate size, E experts.

    fused layout (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, PhiMoE):
        gate_up_proj [E, 2H, D] = [w1; w3] (gate rows, then up rows), down_proj [E, D, H] = w2
        E_e(x) = w2_e (act(w1_e x) * (w3_e x))        (SwiGLU when act is silu)
    GPT-OSS layout: gate_up_proj [E, D, 2H] (gate = even, up = odd columns) with biases and a
        clamped GLU (HF ``_apply_gate``), computed per expert

Calling a view, ``view(rows [M, D], counts [E]) -> [M, D]``, runs the experts over rows grouped
by expert (moegrad's sorted dispatch); ``every_expert`` evaluates all E experts for the
estimators that need the unselected experts' outputs (``dense``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moegrad import experts as _experts
from moegrad._interfaces import ExpertWeights

__all__ = ["IMPLS", "HFExperts", "GptOssExpertsView"]

#: expert compute choices: None (= "auto") or a :data:`moegrad.experts.IMPLS` name run moegrad's
#: grouped expert compute; "hf" calls the block's own experts module (so transformers'
#: ``experts_implementation`` applies)
IMPLS = (None, "hf") + tuple(getattr(_experts, "IMPLS", ("auto", "loop")))


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
            gate, up, down = self.stacked_weights()
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
