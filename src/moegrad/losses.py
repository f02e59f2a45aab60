"""Balance losses: pure functions of one layer call's routing.

Shapes: T tokens, E experts, K top-k. Every loss takes the :class:`~moegrad.routing.Routing`
of one layer call and returns a scalar fp32 tensor; padding tokens (``routing.mask`` False)
are left out, and a call without real tokens gives 0. Nothing is kept in globals, and no
module is walked here: the state that spans calls (:class:`~moegrad.balancing.BalanceWindow`,
:class:`~moegrad.balancing.BiasBalancer`) lives in :mod:`moegrad.balancing`.

=================== ===================================================================
``switch``          E * sum_i f_i P_i, f_i = (pairs routed to i) / T, P_i = mean_t s'_ti
                    (Switch Transformer; equals transformers' ``load_balancing_loss_func``);
                    K at perfect balance
``switch_megatron`` ``switch`` / K: Megatron-Core's scale, 1 at perfect balance
``z_loss``          mean_t logsumexp(z_t)^2 (ST-MoE)
``importance_load`` CV^2(importance) + CV^2(load), importance_i = sum_t w_ti,
                    load_i = sum_t P(x_t, i) smooth load (Shazeer 2017; needs ``noisy_topk``)
``seq_aux``         mean over sequences of sum_i f_i P_i with f_i = E/(K S) * count_i and
                    P_i = mean_t s'_ti within the sequence (DeepSeek-V3); 1 at perfect balance
=================== ===================================================================

s' are the scores normalised to sum to 1 over experts (the softmax itself for ``softmax``).
CV^2(v) = Var(v) / mean(v)^2 with the population variance over experts.

Conventions against Megatron-Core (``megatron/core/transformer/moe/moe_utils.py``
``switch_load_balancing_loss_func``, ``compute_routing_scores_for_aux_loss``; ``router.py``
``TopKRouter._apply_seq_aux_loss``), which computes the same losses up to these choices:

- ``switch`` is K at perfect balance (transformers' convention: f sums to K). Megatron-Core
  divides f by K, so its loss is 1 at perfect balance and the same coefficient weighs K times
  more in moegrad. ``losses={"switch_megatron": c}`` is Megatron-Core's scale (``switch`` / K),
  so c means what ``moe_aux_loss_coeff=c`` means there.
- ``seq_aux`` with padding divides each sequence's counts and scores by that sequence's own
  number of real tokens, and averages over the sequences that have one. Megatron-Core divides
  every sequence by the batch's mean real length and averages over all B sequences. Without
  padding the two are equal (both 1 at perfect balance).
- Under a selection bias (``selection_bias=True``, DeepSeek-V3's ``e_score_correction_bias``),
  group-limited top-k or a sampling estimator, the counts f are of the experts actually
  selected (``routing.indices``). Megatron-Core counts the top-k of the unbiased scores (no
  bias, no group limit), experts that the tokens may not have gone to.
- ``z_loss`` is the same (mean over real tokens).

Expert parallelism (``group``, set by :func:`moegrad.distributed.expert_parallel`): token and
sequence counts are summed over the W ranks of the group (no gradient) and each rank returns its
share of the loss of the whole micro-batch, scaled so that the mean over ranks equals the loss
one process would compute on every rank's tokens (no factor W); ``importance_load`` sums its
importance and load over the ranks with :func:`moegrad.distributed.all_reduce_share`
(from :mod:`moegrad._collectives`). With
``group=None`` (the default) nothing changes.

Gradient accumulation (:class:`moegrad.balancing.BalanceWindow`, opt-in): the ``switch`` loss
takes f from the counts of every micro-batch since the window was last reset (all ranks, this
micro-batch included), passed in as ``window``, instead of this micro-batch alone; P stays this
micro-batch's.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from moegrad._collectives import all_reduce_detached, all_reduce_share, group_size
from moegrad._moved import moved_names
from moegrad._spec import bind_losses, check_losses, loss_names
from moegrad.routing import Routing, recomputing_in_backward


def _real(routing: Routing) -> Tensor:
    """[T] float weights: 1 for real tokens, 0 for padding."""
    if routing.mask is None:
        return torch.ones(routing.num_tokens, device=routing.logits.device)
    return routing.mask.float()


def _assigned(routing: Routing) -> Tensor:
    """[T, E] float: how many of token t's K slots chose expert i (0 or 1)."""
    out = torch.zeros_like(routing.logits)
    return out.scatter_(1, routing.indices, 1.0)


def _normalized_scores(routing: Routing) -> Tensor:
    s = routing.scores
    return s / (s.sum(-1, keepdim=True) + 1e-20)


def _global(group, *values: Tensor) -> tuple:
    """Sums over the ranks of ``group`` (no gradient) and W; (values, 1) without a group."""
    if group is None:
        return values, 1
    sizes = [v.numel() for v in values]
    flat = all_reduce_detached(torch.cat([v.reshape(-1).double() for v in values]), group)
    parts = [p.view_as(v).to(v.dtype) for p, v in zip(flat.split(sizes), values)]
    return tuple(parts), group_size(group)


def switch_loss(routing: Routing, group=None, window=None) -> Tensor:
    """E * sum_i f_i P_i; f sums to K over experts, so the loss is K at perfect balance
    (transformers' convention; Megatron-Core's is 1, see :func:`switch_megatron_loss`).
    f counts the experts actually selected (``routing.indices``, after any selection bias).

    With ``group``: f from the counts of all ranks, this rank's share W * sum_{t here} s'_t / N.
    With ``window`` (int64 [E + 1], :class:`~moegrad.balancing.BalanceWindow`'s buffer: counts C
    per expert, then the real-token count N): this call's (global) counts are added to it first, then
    f_i = C_i / N over every micro-batch of the window so far; P is still this call's."""
    real = _real(routing)
    n = real.sum()
    counts = (_assigned(routing) * real[:, None]).sum(0)
    (counts, n), share = _global(group, counts, n)
    if window is not None:
        num_experts = routing.logits.shape[1]
        if not isinstance(window, Tensor) or window.dtype != torch.int64 or window.shape != (num_experts + 1,):
            raise ValueError(f"window must be an int64 tensor of shape [{num_experts + 1}] (counts per "
                             f"expert, then tokens), got {getattr(window, 'dtype', type(window))} "
                             f"{tuple(getattr(window, 'shape', ()))}")
        if not recomputing_in_backward():  # checkpointing's recomputation: counted already
            with torch.no_grad():
                window += torch.cat([counts, n.reshape(1)]).round().to(window)
    # under torch.compile no host read: n = 0 gives 0 through torch.where (n -> 1 keeps it finite)
    empty = (n == 0) if torch.compiler.is_compiling() else None
    if empty is not None:
        n = torch.where(empty, torch.ones_like(n), n)
    elif float(n) == 0:
        return routing.logits.new_zeros(())
    if window is None:
        f = counts / n
    else:
        f = (window[:-1].double() / window[-1].double()).to(counts)
    p = (_normalized_scores(routing) * real[:, None]).sum(0) / n
    if share != 1:
        p = p * share
    loss = routing.logits.shape[1] * (f * p).sum()
    return loss if empty is None else torch.where(empty, torch.zeros_like(loss), loss)


def switch_megatron_loss(routing: Routing, group=None, window=None) -> Tensor:
    """Megatron-Core's scale of ``switch``: E / K * sum_i f_i P_i = ``switch`` / K, 1 at perfect
    balance (Megatron-Core ``switch_load_balancing_loss_func``: E / (K T^2) * sum_i
    count_i * sum_t s'_ti). ``{"switch_megatron": c}`` weighs the loss as Megatron-Core's
    ``moe_aux_loss_coeff=c`` does. The counts are still the experts actually selected (Megatron-Core
    counts the top-k of the unbiased scores; the same without a selection bias, group-limited
    top-k or sampling). ``group`` and ``window`` as for :func:`switch_loss`."""
    return switch_loss(routing, group=group, window=window) / routing.indices.shape[1]


def z_loss(routing: Routing, group=None) -> Tensor:
    """mean_t logsumexp(z_t)^2 over real tokens (ST-MoE, Zoph et al. 2022; with ``group``: this
    rank's share of the global mean).

    Summed as sum_t l_t * (l_t * m_t / N) (l = logsumexp(z) [T], m the real-token mask): every
    intermediate is at most the result, so finite logits give a finite loss (and gradient
    2 l_t m_t / N * softmax(z_t)) whenever the loss fits the logits' dtype; l_t^2 alone would
    overflow fp32 for |l_t| > 1.8e19. A loss beyond the dtype's range (fp32: logits ~1e20)
    raises a ValueError that says so (on every rank with ``group``). Non-finite logits (with
    ``check_finite=False``) still give a non-finite loss.
    """
    logits = routing.logits
    real = _real(routing).to(logits.dtype)
    lse = torch.logsumexp(logits, dim=-1)  # [T]
    limit = torch.finfo(logits.dtype).max
    if group is None:
        n = real.sum()
        out = (lse * (lse * (real / n.clamp(min=1.0)))).sum()
        if torch.compiler.is_compiling():  # the same check at run time (a custom op): no graph break
            torch.ops.moegrad.check_z_loss_range(out.detach(), lse.detach(), real)
            return torch.where(n > 0, out, torch.zeros_like(out))
        num, finite = torch.stack([n, torch.isfinite(out).to(n.dtype)]).tolist()  # one sync
        if num == 0:
            return logits.new_zeros(())
        if not finite:
            _raise_if_overflowed(lse, real, num)
        return out
    # expert parallelism: decided from global fp64 sums, so every rank raises or none does
    local = (lse.detach().double().square() * real).sum()
    (n, total), share = _global(group, real.sum(), local)
    num, total = float(n), float(total)
    if num == 0:
        return logits.new_zeros(())
    if math.isfinite(total) and total * share / num > limit:  # some rank's share W l^2/N may not fit
        (over,), _ = _global(group, (local * share / num > limit).double())
        if float(over) > 0:
            _z_loss_overflow(total / num, lse, real, limit)
    return (lse * (lse * (real * (share / num)))).sum()


def _raise_if_overflowed(lse: Tensor, real: Tensor, num: float) -> None:
    """A non-finite local z_loss over ``num`` real tokens: raise the overflow error if every real
    token's logsumexp is finite (else the logits themselves were not: the loss stays NaN/Inf)."""
    if bool(torch.isfinite(lse[real > 0]).all()):
        total = sum(v * v for v in lse.detach()[real > 0].tolist()) / num  # Python floats (fp64)
        _z_loss_overflow(total, lse, real, torch.finfo(lse.dtype).max)


@torch.library.custom_op("moegrad::check_z_loss_range", mutates_args=())
def _check_z_loss_range(out: Tensor, lse: Tensor, real: Tensor) -> None:
    """z_loss's overflow check under torch.compile, at run time: out 0-d, lse [T], real [T]."""
    num = float(real.sum())
    if num and not bool(torch.isfinite(out)):
        _raise_if_overflowed(lse, real, num)


@_check_z_loss_range.register_fake
def _(out, lse, real):
    return None


torch.fx.node.has_side_effect(torch.ops.moegrad.check_z_loss_range.default)  # no output, kept


def _z_loss_overflow(mean: float, lse: Tensor, real: Tensor, limit: float) -> None:
    big = float(lse.detach()[real > 0].abs().max()) if bool((real > 0).any()) else float("nan")
    raise ValueError(
        f"z_loss = mean_t logsumexp(z_t)^2 = {mean:.3g} exceeds the {str(lse.dtype)[6:]} range "
        f"({limit:.3g}): the router logits reach |logsumexp| = {big:.3g}. Logits this large mean "
        "the router has diverged: lower the learning rate, clip gradients, or give z_loss a "
        "coefficient from the start")


def cv_squared(v: Tensor) -> Tensor:
    """Var(v) / mean(v)^2 (population variance); 0 for a single element or all zeros."""
    if v.numel() <= 1:
        return v.new_zeros(())
    return v.var(correction=0) / (v.mean().square() + 1e-10)


def importance_load_loss(routing: Routing, group=None) -> Tensor:
    """CV^2(importance) + CV^2(smooth load) (Shazeer 2017, appendix A)."""
    if routing.load_probs is None:
        raise ValueError("the importance_load loss needs the smooth load of estimator='noisy_topk'; "
                         "use noisy_topk or choose another loss (switch, z_loss, seq_aux)")
    real = _real(routing)[:, None]
    gates = torch.zeros_like(routing.logits).scatter(1, routing.indices, routing.weights)
    importance = (gates * real).sum(0)
    load = (routing.load_probs * real).sum(0)
    if group is not None:  # the same global sums on every rank (gradient: see all_reduce_share)
        importance, load = all_reduce_share(torch.stack([importance, load]), group).unbind(0)
    return cv_squared(importance) + cv_squared(load)


def seq_aux_loss(routing: Routing, group=None) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss (without its alpha, which is the coefficient):
    mean_b sum_i f_bi P_bi, f_bi = E / (K n_b) * count_bi, P_bi = sum_t s'_bti / n_b; 1 at
    perfect balance.

    The input's leading shape (B, S) gives the sequences; a [T, D] input is one sequence. With
    padding, n_b is sequence b's own number of real tokens and the mean is over the sequences
    that have one (Megatron-Core divides by the batch's mean real length and averages over all
    B; equal without padding). Counts are of the experts actually selected.
    """
    num_experts, top_k = routing.logits.shape[1], routing.indices.shape[1]
    seqs, length = routing.shape if len(routing.shape) == 2 else (1, routing.num_tokens)
    real = _real(routing).view(seqs, length)  # [B, S]
    n = real.sum(1)  # [B]
    counts = (_assigned(routing).view(seqs, length, num_experts) * real[..., None]).sum(1)  # [B, E]
    probs = (_normalized_scores(routing).view(seqs, length, num_experts) * real[..., None]).sum(1)
    has = n > 0
    (num_seqs,), share = _global(group, has.sum())
    if int(num_seqs) == 0:
        return routing.logits.new_zeros(())
    n = n[has, None]
    f = counts[has] * num_experts / (top_k * n)
    p = probs[has] / n
    if group is None:
        return (f * p).sum(1).mean()
    return (f * p).sum(1).sum() * share / num_seqs  # this rank's share of the mean over all sequences


#: {name: function}, the names of :data:`moegrad._spec.LOSS_FUNCTIONS`
LOSSES: dict[str, Callable[[Routing], Tensor]] = bind_losses(globals())
available = loss_names  # sorted names of the balance losses


#: the losses that take f from counts a :class:`~moegrad.balancing.BalanceWindow` can accumulate
SWITCH_LOSSES = ("switch", "switch_megatron")


def balance_losses(routing: Routing, coefficients: dict[str, float],
                   group=None, window=None) -> tuple[Tensor, dict[str, Tensor]]:
    """-> (sum_name coef * loss, {name: loss}) for one layer call (``group``: expert parallelism,
    see the module docstring; ``window``: the ``switch`` loss's accumulation buffer, see
    :class:`~moegrad.balancing.BalanceWindow`). With both ``switch`` and ``switch_megatron``, the
    second is the first / K (one count, one window update)."""
    if window is not None and not any(name in coefficients for name in SWITCH_LOSSES):
        raise ValueError(f"window is only used by the switch loss ({' or '.join(SWITCH_LOSSES)}), "
                         f"which is not among the losses {sorted(coefficients)}")

    def one(name):
        options = {} if group is None else {"group": group}
        if name in SWITCH_LOSSES and window is not None:
            options["window"] = window
        return LOSSES[name](routing, **options)

    both = all(name in coefficients for name in SWITCH_LOSSES)
    values = {name: one(name) for name in coefficients if not (both and name == "switch_megatron")}
    if both:
        values["switch_megatron"] = values["switch"] / routing.indices.shape[1]
    total = routing.logits.new_zeros(())
    for name in coefficients:
        total = total + coefficients[name] * values[name]
    return total, {name: values[name] for name in coefficients}


#: moved to moegrad.balancing; still importable from here with a DeprecationWarning
__getattr__ = moved_names(__name__, {"BalanceWindow": "moegrad.balancing",
                                     "BiasBalancer": "moegrad.balancing"})

__all__ = ["LOSSES", "available", "switch_loss", "switch_megatron_loss", "z_loss", "importance_load_loss",
           "seq_aux_loss",
           "cv_squared", "balance_losses", "check_losses"]
