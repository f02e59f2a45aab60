"""Balance losses in MLX (the maths of :mod:`moegrad.losses`): pure functions of a Routing.

Shapes: T tokens, E experts, K top-k. Every loss takes one layer call's
:class:`~moegrad.mlx.routing.Routing` and returns a scalar fp32 array; padding tokens
(``routing.mask`` False) are left out; a call without real tokens gives 0.

=================== ===================================================================
``switch``          E * sum_i f_i P_i, f_i = (pairs routed to i) / T, P_i = mean_t s'_ti
                    (K at perfect balance, transformers' convention)
``switch_megatron`` ``switch`` / K (Megatron-Core's scale, 1 at perfect balance)
``z_loss``          mean_t logsumexp(z_t)^2
``importance_load`` CV^2(importance) + CV^2(smooth load)   (needs ``noisy_topk``)
``seq_aux``         mean over sequences of sum_i f_i P_i, f_i = E/(K S) count_i (DeepSeek-V3)
=================== ===================================================================

s' are the scores normalised to sum to 1 over experts; CV^2(v) = Var(v) / mean(v)^2. The
conventions against Megatron-Core (switch's scale, seq_aux's padding, counting the experts
actually selected under a selection bias) are those of :mod:`moegrad.losses`.

``LOSSES`` binds these functions to the names of :data:`moegrad._spec.LOSS_FUNCTIONS` and
``available`` is :func:`moegrad._spec.loss_names`, as on the PyTorch side; auxiliary-loss-free
balancing (a state updated between steps) is :mod:`moegrad.mlx.balancing`.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx

from moegrad._moved import moved_names
from moegrad._spec import bind_losses, loss_names
from moegrad.mlx.ops import one_hot, selected_mask
from moegrad.mlx.routing import Routing


def _real(routing: Routing) -> mx.array:
    """[T] float32: 1 for real tokens, 0 for padding."""
    if routing.mask is None:
        return mx.ones((routing.num_tokens,), dtype=mx.float32)
    return routing.mask.astype(mx.float32)


def _normalized_scores(routing: Routing) -> mx.array:
    s = routing.scores
    return s / (s.sum(-1, keepdims=True) + 1e-20)


def switch_loss(routing: Routing) -> mx.array:
    """E * sum_i f_i P_i (equals K at perfect balance; f counts the experts actually selected)."""
    real = _real(routing)
    n = real.sum()
    if float(n) == 0:
        return mx.array(0.0)
    f = (selected_mask(routing.indices, routing.logits.shape[1]) * real[:, None]).sum(0) / n
    p = (_normalized_scores(routing) * real[:, None]).sum(0) / n
    return routing.logits.shape[1] * (f * p).sum()


def switch_megatron_loss(routing: Routing) -> mx.array:
    """``switch`` / K: Megatron-Core's scale (1 at perfect balance), see
    :func:`moegrad.losses.switch_megatron_loss`."""
    return switch_loss(routing) / routing.indices.shape[1]


def z_loss(routing: Routing) -> mx.array:
    """mean_t logsumexp(z_t)^2 over real tokens, summed as sum_t l_t * (l_t * m_t / N) so that
    finite logits give a finite loss and gradient whenever the loss fits fp32; a loss beyond
    fp32 (logits ~1e20) raises a ValueError (see :func:`moegrad.losses.z_loss`)."""
    real = _real(routing)
    n = real.sum()
    if float(n) == 0:
        return mx.array(0.0)
    lse = mx.logsumexp(routing.logits, axis=-1)  # [T]
    out = (lse * (lse * (real / n))).sum()
    if not bool(mx.isfinite(out)):
        keep = [v for v, m in zip(lse.tolist(), real.tolist()) if m > 0]
        if all(math.isfinite(v) for v in keep):  # finite logits: the loss itself is too large
            limit = float(mx.finfo(routing.logits.dtype).max)
            raise ValueError(
                f"z_loss = mean_t logsumexp(z_t)^2 = {sum(v * v for v in keep) / len(keep):.3g} "
                f"exceeds the float32 range ({limit:.3g}): the router logits reach |logsumexp| = "
                f"{max(abs(v) for v in keep):.3g}. Logits this large mean the router has diverged: "
                "lower the learning rate, clip gradients, or give z_loss a coefficient from the start")
    return out


def cv_squared(v: mx.array) -> mx.array:
    """Var(v) / mean(v)^2 (population variance); 0 for a single element."""
    if v.size <= 1:
        return mx.array(0.0)
    return mx.var(v) / (mx.square(v.mean()) + 1e-10)


def importance_load_loss(routing: Routing) -> mx.array:
    """CV^2(importance) + CV^2(smooth load) (Shazeer 2017, appendix A)."""
    if routing.load_probs is None:
        raise ValueError("the importance_load loss needs the smooth load of estimator='noisy_topk'; "
                         "use noisy_topk or choose another loss (switch, z_loss, seq_aux)")
    real = _real(routing)[:, None]
    hot = one_hot(routing.indices, routing.logits.shape[1])  # [T, K, E]
    gates = (hot * routing.weights[..., None]).sum(1)  # [T, E]
    importance = (gates * real).sum(0)
    load = (routing.load_probs * real).sum(0)
    return cv_squared(importance) + cv_squared(load)


def seq_aux_loss(routing: Routing) -> mx.array:
    """DeepSeek-V3 sequence-wise balance loss (without alpha, which is the coefficient)."""
    num_experts, top_k = routing.logits.shape[1], routing.indices.shape[1]
    seqs = routing.shape[0] if len(routing.shape) == 2 else 1
    real = _real(routing).reshape(seqs, -1)  # [B, S]
    n = real.sum(1)  # [B]
    assigned = selected_mask(routing.indices, num_experts).reshape(seqs, -1, num_experts)
    cnt = (assigned * real[..., None]).sum(1)  # [B, E]
    probs = (_normalized_scores(routing).reshape(seqs, -1, num_experts) * real[..., None]).sum(1)
    has = n > 0
    num_seqs = int(has.sum())
    if num_seqs == 0:
        return mx.array(0.0)
    safe = mx.maximum(n, 1.0)[:, None]
    per_seq = ((cnt * num_experts / (top_k * safe)) * (probs / safe)).sum(1)  # [B]
    return mx.where(has, per_seq, 0.0).sum() / num_seqs


#: {name: loss function}, bound by name to :data:`moegrad._spec.LOSS_FUNCTIONS` as on the PyTorch side
LOSSES: dict[str, Callable[[Routing], mx.array]] = bind_losses(globals())
#: sorted names of the balance losses
available = loss_names


def balance_losses(routing: Routing, coefficients: dict) -> tuple:
    """-> (sum_name coef * loss, {name: loss}) for one layer call."""
    values = {name: LOSSES[name](routing) for name in coefficients}
    total = mx.array(0.0)
    for name, value in values.items():
        total = total + coefficients[name] * value
    return total, values


#: moved to moegrad.mlx.balancing; still importable from here with a DeprecationWarning
__getattr__ = moved_names(__name__, {"BiasBalancer": "moegrad.mlx.balancing"})
