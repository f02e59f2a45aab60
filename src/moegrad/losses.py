"""Balance losses and auxiliary-loss-free balancing.

Shapes: T tokens, E experts, K top-k. Every loss takes the :class:`~moegrad.routing.Routing`
of one layer call and returns a scalar fp32 tensor; padding tokens (``routing.mask`` False)
are left out, and a call without real tokens gives 0. Nothing is kept in globals.

=================== ===================================================================
``switch``          E * sum_i f_i P_i, f_i = (pairs routed to i) / T, P_i = mean_t s'_ti
                    (Switch Transformer; equals transformers' ``load_balancing_loss_func``)
``z_loss``          mean_t logsumexp(z_t)^2 (ST-MoE)
``importance_load`` CV^2(importance) + CV^2(load), importance_i = sum_t w_ti,
                    load_i = sum_t P(x_t, i) smooth load (Shazeer 2017; needs ``noisy_topk``)
``seq_aux``         mean over sequences of sum_i f_i P_i with f_i = E/(K S) * count_i and
                    P_i = mean_t s'_ti within the sequence (DeepSeek-V3)
=================== ===================================================================

s' are the scores normalised to sum to 1 over experts (the softmax itself for ``softmax``).
CV^2(v) = Var(v) / mean(v)^2 with the population variance over experts.

Expert parallelism (``group``, set by :func:`moegrad.distributed.expert_parallel`): token and
sequence counts are summed over the W ranks of the group (no gradient) and each rank returns its
share of the loss of the whole micro-batch, scaled so that the mean over ranks equals the loss
one process would compute on every rank's tokens (no factor W); ``importance_load`` sums its
importance and load over the ranks with :func:`moegrad.distributed.all_reduce_share`. With
``group=None`` (the default) nothing changes.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from moegrad._checks import check_float
from moegrad.routing import Router, Routing


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
    from moegrad.distributed import all_reduce_detached, group_size

    sizes = [v.numel() for v in values]
    flat = all_reduce_detached(torch.cat([v.reshape(-1).double() for v in values]), group)
    parts = [p.view_as(v).to(v.dtype) for p, v in zip(flat.split(sizes), values)]
    return tuple(parts), group_size(group)


def switch_loss(routing: Routing, group=None) -> Tensor:
    """E * sum_i f_i P_i; f sums to K over experts, so the loss is K at perfect balance.

    With ``group``: f from the counts of all ranks, this rank's share W * sum_{t here} s'_t / N."""
    real = _real(routing)
    n = real.sum()
    counts = (_assigned(routing) * real[:, None]).sum(0)
    (counts, n), share = _global(group, counts, n)
    if float(n) == 0:
        return routing.logits.new_zeros(())
    f = counts / n
    p = (_normalized_scores(routing) * real[:, None]).sum(0) / n
    if share != 1:
        p = p * share
    return routing.logits.shape[1] * (f * p).sum()


def z_loss(routing: Routing, group=None) -> Tensor:
    """mean_t logsumexp(z_t)^2 over real tokens (with ``group``: this rank's share of the global mean)."""
    real = _real(routing)
    (n,), share = _global(group, real.sum())
    if float(n) == 0:
        return routing.logits.new_zeros(())
    out = (torch.logsumexp(routing.logits, dim=-1).square() * real).sum() / n
    return out * share if share != 1 else out


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
        from moegrad.distributed import all_reduce_share

        importance, load = all_reduce_share(torch.stack([importance, load]), group).unbind(0)
    return cv_squared(importance) + cv_squared(load)


def seq_aux_loss(routing: Routing, group=None) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss (without its alpha, which is the coefficient).

    The input's leading shape (B, S) gives the sequences; a [T, D] input is one sequence.
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


LOSSES: dict[str, Callable[[Routing], Tensor]] = {
    "switch": switch_loss,
    "z_loss": z_loss,
    "importance_load": importance_load_loss,
    "seq_aux": seq_aux_loss,
}


def available() -> list[str]:
    """Sorted names of the balance losses."""
    return sorted(LOSSES)


def check_losses(losses, estimator: str) -> dict[str, float]:
    """Validate ``{name: coefficient}`` for a layer using ``estimator``."""
    if losses is None:
        return {}
    if not isinstance(losses, dict):
        raise TypeError(f"losses must be a dict {{name: coefficient}}, got {type(losses).__name__}; "
                        f"names: {available()}")
    out = {}
    for name, coef in losses.items():
        if name not in LOSSES:
            raise ValueError(f"loss {name!r} is unknown; choose from {available()}")
        check_float(f"losses[{name!r}]", coef, low=0.0)
        out[name] = float(coef)
    if "importance_load" in out and estimator != "noisy_topk":
        raise ValueError(f"the importance_load loss needs estimator='noisy_topk' (its smooth load), "
                         f"got estimator={estimator!r}")
    return out


def balance_losses(routing: Routing, coefficients: dict[str, float],
                   group=None) -> tuple[Tensor, dict[str, Tensor]]:
    """-> (sum_name coef * loss, {name: loss}) for one layer call (``group``: expert parallelism,
    see the module docstring)."""
    values = {name: (LOSSES[name](routing) if group is None else LOSSES[name](routing, group=group))
              for name in coefficients}
    total = routing.logits.new_zeros(())
    for name, value in values.items():
        total = total + coefficients[name] * value
    return total, values


class BiasBalancer:
    """Auxiliary-loss-free balancing (DeepSeek-V3): b_i += gamma * sign(mean_load - load_i).

    ``module`` is a Router, an MoE or a whole model: every Router inside it that was built with
    ``selection_bias=True`` is balanced. Loads are the routers' ``load_counts`` buffers, gathered
    in training mode since the last :meth:`step`; call :meth:`step` after ``optimizer.step()``.
    The bias changes which experts are selected, never the combine weights.
    """

    def __init__(self, module: nn.Module, gamma: float = 1e-3) -> None:
        check_float("gamma", gamma, low=0.0)
        self.gamma = float(gamma)
        self.routers: list[Router] = [m for m in module.modules()
                                      if isinstance(m, Router) and m.bias is not None]
        if not self.routers:
            raise ValueError(f"{type(module).__name__} holds no Router with a selection bias; "
                             "build it with selection_bias=True")

    @torch.no_grad()
    def step(self) -> list[Tensor]:
        """Update every bias from its counts, reset the counts; returns the loads used."""
        loads = []
        for router in self.routers:
            load = router.reset_load_counts().float()
            group = getattr(router, "process_group", None)  # set by moegrad.distributed.expert_parallel
            if group is not None:  # every rank applies the same update from the global loads
                from moegrad.distributed import all_reduce_detached

                load = all_reduce_detached(load, group)
            if load.sum() > 0:
                router.bias += self.gamma * torch.sign(load.mean() - load)
            loads.append(load)
        return loads


__all__ = ["LOSSES", "available", "switch_loss", "z_loss", "importance_load_loss", "seq_aux_loss",
           "cv_squared", "balance_losses", "check_losses", "BiasBalancer"]
