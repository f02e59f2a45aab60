"""Estimators that give the router a gradient for the experts it did not select
(MLX twins of :mod:`moegrad.estimators.dense`).

Notation per token: s [E] scores, S the K selected experts, e_i = E_i(x), g = dL/dy,
c = routed_scaling_factor. Both keep the ``topk`` forward and gradient for i in S and add, for
i not in S, dL/ds_i = c <g, v_i> / n with v_i = E_i(x) (``dense``) or the default output ebar_i
(``default_moe``), n = 1 (``normalize=False``) or n = sg(sum_S s + 1e-20) (``normalize=True``,
DenseMixer's weight s_j / sg(sum_S s) for an unselected expert of a renormalised top-k).
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx

from moegrad._spec import dense_chunk_tokens
from moegrad.mlx.estimators.base import Estimator, Picked, topk_picked
from moegrad.mlx.experts import stop_weights
from moegrad.mlx.ops import selected_mask


def unselected_scores(scores: mx.array, indices: mx.array, normalize: bool) -> mx.array:
    """[T, E] scores as the unselected experts' weights use them: s (``normalize=False``) or
    s / sg(sum_S s + 1e-20) (``normalize=True``, the epsilon of ``Router.combine_weights``)."""
    if not normalize:
        return scores
    total = mx.stop_gradient(mx.take_along_axis(scores, indices, axis=-1)).sum(-1, keepdims=True)
    return scores / (total + 1e-20)


def dense_score_grad(grad_y: mx.array, x: mx.array, indices: mx.array, expert_fn: Callable,
                     weights: Optional[tuple], scale: float, chunk_tokens: int) -> mx.array:
    """dL/ds [T, E] fp32 for the unselected experts: c <g_t, E_i(x_t)>, 0 for i in S.

    grad_y [T, D], x [T, D], indices [T, K]; ``expert_fn(x [t, D], weights) -> [t, E, D]`` runs
    on stop-gradient ``weights`` (an experts module's ``stacked_weights()`` named tuple; None for
    experts without float weights, which ``expert_fn`` then runs itself) ``chunk_tokens`` tokens
    at a time and its result is consumed chunk by chunk, so the extra memory is about
    chunk_tokens * E * max(D, H).
    """
    num_tokens = x.shape[0]
    weights = None if weights is None else stop_weights(weights)
    x, grad_y = mx.stop_gradient(x), grad_y.astype(mx.float32)
    parts = []
    for start in range(0, num_tokens, chunk_tokens):
        stop = min(start + chunk_tokens, num_tokens)
        every = expert_fn(x[start:stop], weights).astype(mx.float32)  # [t, E, D]
        part = (every * grad_y[start:stop, None, :]).sum(-1)  # [t, E]
        if num_tokens > chunk_tokens:
            mx.eval(part)  # materialise chunk by chunk: one [t, E, H] buffer lives at a time
        parts.append(part)
    out = mx.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    out = out * (1.0 - selected_mask(indices, out.shape[1]))
    return out * scale if scale != 1.0 else out


def dense_router_grad(y: mx.array, scores: mx.array, x: mx.array, indices: mx.array,
                      expert_fn: Callable, weights: Optional[tuple], scale: float = 1.0,
                      chunk_tokens: int = 1024) -> mx.array:
    """Return y unchanged; its VJP adds c <g, E_i(x)> to scores[:, i] for unselected i (pass
    :func:`unselected_scores` for renormalised top-k: the division then scales it by 1 / sum_S s).

    An ``mx.custom_function`` of (y, scores): x, indices and the expert weights are closed
    over, so they receive no gradient from this path (expert weights learn only from the
    tokens routed to them). The unselected experts run only when the VJP is evaluated.
    """

    @mx.custom_function
    def identity(y_, scores_):
        return y_

    @identity.vjp
    def identity_vjp(primals, cotangent, output):
        return cotangent, dense_score_grad(cotangent, x, indices, expert_fn, weights, scale,
                                           chunk_tokens)

    return identity(y, scores)


class Dense(Estimator):
    """``dense``: exact dense straight-through (DenseMixer, Yao et al. 2025).

    Forward: as ``topk``. Router gradient: as ``topk`` for i in S; for i not in S,
    dL/ds_i = c <g, E_i(x)> as if y also held c s_i E_i(x); with ``normalize=True``
    dL/ds_i = c <g, E_i(x)> / sum_S s, as if y held c s_i / sg(sum_S s) E_i(x) (the weight of the
    renormalised forward, as in DenseMixer). The unselected E_i(x) are evaluated
    only in the VJP, ``chunk_tokens`` tokens at a time (None: about 16M elements of
    [t, E, max(D, H)]), on stop-gradient weights: expert weights and the input get gradient
    only from the selected (token, expert) pairs.

    Options: ``chunk_tokens`` (int >= 1 or None).
    """

    name = "dense"

    def route(self, x, z, scores, selection) -> Picked:
        return topk_picked(scores, selection)

    def mix(self, y, x, routing, experts):
        if y.shape[0] == 0:
            return y
        chunk = dense_chunk_tokens(self.chunk_tokens, experts.dim, experts.hidden_dim,
                                   experts.num_experts)
        scores = unselected_scores(routing.scores, routing.indices, self.config.normalize)
        return dense_router_grad(y, scores, x, routing.indices, experts.every_expert,
                                 experts.stacked_weights(), self.config.routed_scaling_factor, chunk)


class DefaultMoE(Estimator):
    """``default_moe``: dense router gradient from default outputs (Panda et al. 2025).

    Frozen state: ``defaults`` ebar [E, D] fp32, an EMA of expert i's mean output over the
    tokens routed to it (ebar_i <- beta ebar_i + (1 - beta) mean_i; the first observation is
    taken as is), ``seen`` [E] bool and ``skipped`` [E] int64, the observations of expert i left
    out because their mean (or the updated default) was not finite (one NaN/Inf token routed to
    i poisons that batch's mean; it never enters ``defaults``, so every other token keeps
    ``topk``'s output); updated in training mode only, never trained.

    ``forward_defaults=True`` is the paper's layer y = sum_S w_i e_i + c sum_{i not in S} s_i
    ebar_i; the default ``False`` keeps the ``topk`` forward and applies the same router
    gradient straight-through: y + (m - sg(m)), m = c sum_{i not in S} s_i ebar_i. With
    ``normalize=True`` (both modes) m = c sum_{i not in S} s_i ebar_i / sg(sum_S s + 1e-20), the
    defaults weighed like the renormalised selected experts, as ``dense`` does.

    Options: ``beta`` in [0, 1) (default 0.9), ``forward_defaults`` (default False).
    """

    name = "default_moe"

    def __init__(self, config, **options) -> None:
        super().__init__(config, **options)
        self.defaults = mx.zeros((config.num_experts, config.dim), dtype=mx.float32)
        self.seen = mx.zeros((config.num_experts,), dtype=mx.bool_)
        self.skipped = mx.zeros((config.num_experts,), dtype=mx.int64)
        self.freeze(keys=["defaults", "seen", "skipped"], recurse=False)

    def route(self, x, z, scores, selection) -> Picked:
        return topk_picked(scores, selection)

    def mix(self, y, x, routing, experts):
        if y.shape[0] == 0:
            return y
        scores = unselected_scores(routing.scores, routing.indices, self.config.normalize)
        coef = scores * (1.0 - selected_mask(routing.indices, self.config.num_experts))
        m = (coef * self.config.routed_scaling_factor) @ mx.stop_gradient(self.defaults)  # [T, D]
        if not self.forward_defaults:
            m = m - mx.stop_gradient(m)  # value exactly 0, gradient of m
        return y + m.astype(y.dtype)

    def observe(self, sums: mx.array, counts: mx.array) -> None:
        hit = counts > 0
        mean = mx.stop_gradient(sums).astype(mx.float32) / mx.maximum(counts, 1)[:, None].astype(mx.float32)
        blended = self.beta * self.defaults + (1.0 - self.beta) * mean
        fresh = hit & ~self.seen
        new = mx.where(fresh[:, None], mean, blended).astype(self.defaults.dtype)
        bad = hit & ~mx.isfinite(new).all(-1)  # a non-finite mean, or an update that overflows
        keep = hit & ~bad
        self.defaults = mx.where(keep[:, None], new, self.defaults)
        self.seen = self.seen | keep
        self.skipped = self.skipped + bad.astype(self.skipped.dtype)
