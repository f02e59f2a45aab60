"""Estimators that give the router a gradient for the experts it did not select.

Notation per token: s [E] scores, S the K selected experts, e_i = E_i(x), g = dL/dy,
c = routed_scaling_factor. Both keep the ``topk`` forward and the ``topk`` gradient for i in S,
and add, for i not in S, dL/ds_i = c * <g, v_i> / n with v_i = e_i (``dense``) or the default
output ebar_i (``default_moe``), and n = 1 (``normalize=False``) or n = sg(sum_S s + 1e-20)
(``normalize=True``): an unselected expert is weighed like the selected ones, whose weights
are c * s_i / sum_S s. That is DenseMixer's rule for renormalised top-k (Yao et al. 2025,
github.com/yaof20/DenseMixer, ``qwen3_moe_custom.py``: weight s_j / sg(sum_S s) for j not in S).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from moegrad._interfaces import rebuild_weights
from moegrad._spec import dense_chunk_tokens
from moegrad.estimators.base import Estimator, Picked
from moegrad.experts import map_weights


def unselected_mask(indices: Tensor, num_experts: int) -> Tensor:
    """[T, K] indices -> [T, E] float mask, 1 where the expert was not selected.

    A comparison with arange(E), not ``ones.scatter_(1, indices, 0)``: under torch.compile
    (torch 2.13, inductor CPU) the scatter, fused into the router's backward kernel together
    with the top-k gather's gradient, gave ``default_moe`` a wrong router gradient (x.grad off
    by 0.02 on a 16-token layer; right with ``aot_eager`` or inductor's ``max_fusion_size=1``)."""
    experts = torch.arange(num_experts, device=indices.device)
    return (indices[:, :, None] != experts).all(1).float()


def unselected_scores(scores: Tensor, indices: Tensor, normalize: bool) -> Tensor:
    """[T, E] scores as the unselected experts' weights use them: s (``normalize=False``) or
    s / sg(sum_S s + 1e-20) (``normalize=True``, the epsilon of ``Router.combine_weights``), so
    the gradient reaching s_i through them is divided by the token's sum of selected scores."""
    if not normalize:
        return scores
    total = scores.detach().gather(1, indices).sum(-1, keepdim=True) + 1e-20  # [T, 1]
    return scores / total


def inner_products_from_every_expert(expert_fn: Callable) -> Callable:
    """Adapt ``expert_fn(x [t, D], weights) -> [t, E, D]`` (all experts on all tokens, an experts
    module's ``every_expert``) to the inner-product form :func:`dense_score_grad` takes:
    (x, g, indices, weights) -> [t, E] <g_t, E_i(x_t)>, 0 for the selected experts."""
    def inner(x: Tensor, grad_y: Tensor, indices: Tensor, weights: tuple) -> Tensor:
        every = expert_fn(x, weights)  # [t, E, D]
        out = torch.einsum("ted,td->te", every, grad_y.to(every.dtype))
        return out * unselected_mask(indices, out.shape[1]).to(out.dtype)
    return inner


def dense_score_grad(grad_y: Tensor, x: Tensor, indices: Tensor, inner_fn: Callable,
                     weights: tuple, scale: float, chunk_tokens: int,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """dL/ds [T, E] (``dtype``, the scores' dtype) for the unselected experts: c * <g_t, E_i(x_t)>, 0 for i in S.

    grad_y [T, D], x [T, D], indices [T, K]; ``weights``: the experts module's
    ``stacked_weights()`` named tuple (E leading every tensor); ``inner_fn(x [t, D], g [t, D],
    indices [t, K], weights) -> [t, E]`` gives the unselected inner products (moegrad's
    :meth:`~moegrad.experts.Experts.unselected_inner_products` evaluates only the T*(E-K)
    unselected pairs; :func:`inner_products_from_every_expert` adapts an all-experts function).
    Evaluated under no_grad on detached weights, ``chunk_tokens`` tokens at a time, so the extra
    memory is about chunk_tokens * E * max(D, H) and no gradient reaches the expert weights.
    """
    num_tokens = x.shape[0]
    weights = map_weights(Tensor.detach, weights)
    out = torch.zeros(num_tokens, weights[0].shape[0], dtype=dtype, device=x.device)
    with torch.no_grad():
        for start in range(0, num_tokens, chunk_tokens):
            part = slice(start, min(start + chunk_tokens, num_tokens))
            out[part] = inner_fn(x[part], grad_y[part], indices[part], weights).to(dtype)
        if scale != 1.0:
            out.mul_(scale)
    return out


class _DenseRouterGrad(torch.autograd.Function):
    """Identity on y; backward adds dL/ds_i = c <g, E_i(x)> for unselected i (see dense_score_grad).
    The weights come in as tensors (``kind`` is their named tuple type, rebuilt in backward)."""

    @staticmethod
    def forward(y, scores, x, indices, scale, chunk_tokens, inner_fn, kind, *weights):
        return y.view_as(y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, scores, x, indices, scale, chunk_tokens, inner_fn, kind, *weights = inputs
        ctx.save_for_backward(x, indices, *weights)
        ctx.scores_dtype = scores.dtype
        ctx.scale, ctx.chunk_tokens, ctx.inner_fn, ctx.kind = scale, chunk_tokens, inner_fn, kind

    @staticmethod
    def backward(ctx, grad_y):
        x, indices, *weights = ctx.saved_tensors
        grad_scores = None
        if ctx.needs_input_grad[1]:
            grad_scores = dense_score_grad(grad_y, x, indices, ctx.inner_fn, rebuild_weights(ctx.kind, weights),
                                           ctx.scale, ctx.chunk_tokens, ctx.scores_dtype)
        return (grad_y, grad_scores) + (None,) * (6 + len(weights))


def dense_router_grad(y: Tensor, scores: Tensor, x: Tensor, indices: Tensor, inner_fn: Callable,
                      weights: tuple, scale: float = 1.0, chunk_tokens: int = 1024) -> Tensor:
    """Return y unchanged; in backward, send c <g, E_i(x)> to scores[:, i] for unselected i.

    y [T, D], scores [T, E] fp32, x [T, D], indices [T, K], ``weights`` the experts module's
    named tuple; see :func:`dense_score_grad`. For renormalised top-k pass
    :func:`unselected_scores` (autograd then divides by sum_S s).
    """
    return _DenseRouterGrad.apply(y, scores, x, indices, scale, chunk_tokens, inner_fn,
                                  type(weights), *weights)


class Dense(Estimator):
    """``dense``: exact dense straight-through (straight-through as in Bengio et al.
    2013; DenseMixer, Yao et al. 2025).

    Forward: as ``topk`` (sparse, y = sum_S w_i e_i). Router gradient: as ``topk`` for i in S;
    for i not in S, dL/ds_i = c * <g, E_i(x)> as if y also held c * s_i E_i(x), and with
    ``normalize=True`` dL/ds_i = c * <g, E_i(x)> / sum_S s, as if y also held
    c * s_i / sg(sum_S s) * E_i(x): the weight consistent with the renormalised forward
    w_i = c * s_i / sum_S s, as in DenseMixer's Qwen3-MoE/OLMoE code. The unselected
    E_i(x) are evaluated in backward under no_grad, ``chunk_tokens`` tokens at a time (default:
    enough for about 16M elements of [t, E, max(D, H)]), so expert weights and the input get
    gradient only from the selected (token, expert) pairs. With moegrad's own experts only the
    T*(E-K) unselected pairs are computed, as <w2_i^T g, a_i(x)> (no down-projection); other
    expert modules (HF) evaluate every expert through their ``every_expert``.

    Options: ``chunk_tokens`` (int >= 1 or None for automatic).
    """

    name = "dense"
    def route(self, x, z, scores, selection) -> Picked:
        indices = selection.select_topk(scores)
        return Picked(indices, selection.combine_weights(scores, indices))

    def mix(self, y, x, routing, experts):
        if not (torch.is_grad_enabled() and routing.scores.requires_grad) or y.shape[0] == 0:
            return y
        weights = experts.stacked_weights()
        chunk = dense_chunk_tokens(self.chunk_tokens, experts.dim, experts.hidden_dim,
                                   experts.num_experts)
        inner = getattr(experts, "unselected_inner_products", None)  # optional in ExpertsModule
        if inner is None:  # expert modules without the fast path (e.g. HF with a non-SiLU act)
            inner = inner_products_from_every_expert(experts.every_expert)
        return dense_router_grad(y, self._unselected_scores(routing), x, routing.indices, inner,
                                 weights, self.config.routed_scaling_factor, chunk)

    def _unselected_scores(self, routing) -> Tensor:
        """[T, E] the scores the unselected experts' gradient flows through (:func:`unselected_scores`)."""
        return unselected_scores(routing.scores, routing.indices, self.config.normalize)


class DefaultMoE(Estimator):
    """``default_moe``: dense router gradient from default outputs (Panda et al. 2025).

    Buffers: ``defaults`` ebar [E, D] fp32, an EMA of expert i's mean output over the tokens
    routed to it, ebar_i <- beta * ebar_i + (1 - beta) * mean_i (the first observation is
    taken as is), updated in training mode only and never receiving gradient; ``skipped`` [E]
    int64 (not saved in the state dict), how many observations of expert i were left out
    because their mean (or the updated default) was not finite: one NaN/Inf token routed to
    i makes that batch's mean non-finite, and it never enters ``defaults``, so every other
    token keeps ``topk``'s output in this and every later batch.

    The paper's layer output is y = sum_{i in S} w_i e_i + sum_{i not in S} s_i ebar_i: the
    default outputs stand in for the missing experts in the forward pass, so the router
    gradient for i not in S is <g, ebar_i>. That is ``forward_defaults=True`` here. The default
    ``forward_defaults=False`` keeps the forward identical to ``topk`` (so swapping estimators
    never changes a model's outputs) and applies the same router gradient straight-through:
    y + (m - sg(m)) with m = c * sum_{i not in S} s_i ebar_i (``normalize=True``:
    m = c * sum_{i not in S} s_i ebar_i / sg(sum_S s + 1e-20), the default outputs weighed like
    the renormalised selected experts, as ``dense`` does; in both forward modes).

    Options: ``beta`` in [0, 1) (default 0.9), ``forward_defaults`` (default False).
    """

    name = "default_moe"
    def __init__(self, config, **options) -> None:
        super().__init__(config, **options)
        self.register_buffer("defaults", torch.zeros(config.num_experts, config.dim))
        self.register_buffer("seen", torch.zeros(config.num_experts, dtype=torch.bool))
        self.register_buffer("skipped", torch.zeros(config.num_experts, dtype=torch.int64),
                             persistent=False)

    def route(self, x, z, scores, selection) -> Picked:
        indices = selection.select_topk(scores)
        return Picked(indices, selection.combine_weights(scores, indices))

    def mix(self, y, x, routing, experts):
        wants_grad = torch.is_grad_enabled() and routing.scores.requires_grad
        if y.shape[0] == 0 or not (self.forward_defaults or wants_grad):
            return y  # the straight-through term is exactly 0 and nothing asks for its gradient
        scores = unselected_scores(routing.scores, routing.indices, self.config.normalize)
        coef = scores * unselected_mask(routing.indices, self.config.num_experts)
        m = (coef * self.config.routed_scaling_factor) @ self.defaults.to(coef.dtype)  # [T, D]
        if not self.forward_defaults:
            m = m - m.detach()  # value exactly 0, gradient of m
        return y + m.to(y.dtype)

    @torch.no_grad()
    def observe(self, sums: Tensor, counts: Tensor) -> None:
        """The EMA update of ``defaults`` (:func:`update_defaults`, a custom op: under
        torch.compile it runs in the graph, no graph break)."""
        torch.ops.moegrad.update_defaults(self.defaults, self.seen, self.skipped, sums, counts, self.beta)


@torch.library.custom_op("moegrad::update_defaults", mutates_args=("defaults", "seen", "skipped"))
def update_defaults(defaults: Tensor, seen: Tensor, skipped: Tensor, sums: Tensor, counts: Tensor,
                    beta: float) -> None:
    """``default_moe``'s observation, in place: for every expert i with counts[i] > 0,
    mean_i = sums[i] / counts[i] and defaults[i] <- mean_i if not seen[i] (the first observation
    as is) else beta * defaults[i] + (1 - beta) * mean_i, seen[i] <- True; an expert whose new
    default is not finite keeps its old one and skipped[i] += 1.

    defaults [E, D] (fp32, or the model's dtype), seen [E] bool, skipped [E] int64, sums [E, D]
    fp32, counts [E] int64. An opaque custom op: the rows updated depend on the data."""
    hit = counts > 0
    if not bool(hit.any()):
        return
    mean = sums.float()[hit] / counts[hit, None].float()
    old = defaults[hit].float()
    fresh = ~seen[hit]
    blended = beta * old + (1.0 - beta) * mean
    new = torch.where(fresh[:, None], mean, blended).to(defaults.dtype)
    finite = torch.isfinite(new).all(-1)  # a non-finite mean, or an update that overflows
    rows = hit.nonzero().squeeze(1)
    skipped[rows[~finite]] += 1
    rows = rows[finite]
    defaults[rows] = new[finite]
    seen[rows] = True


@update_defaults.register_fake
def _(defaults, seen, skipped, sums, counts, beta):
    return None
