"""ReMoE's L1 penalty and its adaptive coefficient (``routing="remoe"``).

Wang et al., ICLR 2025, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing"
(arXiv 2412.14711). Shapes: T tokens (T_r of them real), E experts, K = ``top_k``, the target
number of active experts per token.

    g = r * ReLU(z / tau)                 [T, E]  gates = combine weights (the router's
                                                  ``Routing.weights``; r routed_scaling_factor)
    A = (g > 0) on real tokens            [T, E]  ``Routing.chosen``: token t goes to expert e
    f_e = E / (K T_r) * sum_t A_te        [E]     load of expert e, 1 at balance (no gradient)
    L1 = (1 / T_r) * sum_t sum_e f_e g_te         the load-balanced L1 penalty
    aux = lambda * L1                             added to the layer's ``aux_loss``
    lambda <- lambda * alpha ** sign(a - K)       a = mean active experts per real token,
                                                  after each training call

So lambda grows (by ``l1_alpha``, 1.2) while tokens use more than K experts and shrinks while
they use fewer, starting from ``l1_init`` (1e-8): the mean number of active experts settles
around K. The paper writes the update with the sparsity S = 1 - a / E and the target
1 - K / E; sign((1 - K/E) - S) = sign(a - K). The gradient is plain autograd: the gates are
differentiable (d g / d z = r / tau where z > 0, 0 elsewhere), no estimator is involved.

Where moegrad differs from the paper: lambda is per layer (the router's ``l1_coefficient``
buffer), steered by that layer's own mean, and updated after every training-mode call (each
micro-batch under gradient accumulation; activation checkpointing's recomputation re-uses the
forward's lambda, see :func:`remoe_penalty`);
the paper keeps one lambda for the model, updated once per step from the sparsity of all
layers. Only the load-balanced L1 is provided (the paper's default; its plain L1 is f_e = 1).
Not supported: expert parallelism, :func:`moegrad.hf.patch`, capacity limits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moegrad.dispatch import snapshot
from moegrad.routing import Routing, unless_recomputing, update_running_state


def remoe_l1_loss(routing: Routing, top_k: int) -> Tensor:
    """The load-balanced L1 penalty L1 = (1 / T_r) sum_t sum_e f_e g_te of a ReMoE call
    (``routing.weights`` the gates g [T, E], ``routing.chosen`` the active pairs) -> 0-d fp32
    tensor; 0 without real tokens."""
    gates, active = routing.weights, routing.chosen
    num_experts = gates.shape[1]
    real = gates.shape[0] if routing.mask is None else routing.mask.sum()
    real = torch.as_tensor(real, dtype=gates.dtype, device=gates.device).clamp_min(1)
    load = active.sum(0).to(gates.dtype) * (num_experts / top_k) / real  # f [E], no gradient
    return (gates * load).sum() / real


@torch.no_grad()
def l1_coefficient_factor(routing: Routing, top_k: int, alpha: float, like: Tensor) -> Tensor:
    """alpha ** sign(a - K), a the mean number of active experts per real token of ``routing``
    (1 for a call without real tokens): 0-d, ``like``'s dtype and device."""
    real = routing.chosen.shape[0] if routing.mask is None else routing.mask.sum()
    real = torch.as_tensor(real, device=like.device)
    mean_active = routing.chosen.sum() / real.clamp_min(1)
    step = torch.sign(mean_active - top_k) * (real > 0)
    return torch.pow(torch.as_tensor(alpha, dtype=like.dtype, device=like.device), step.to(like.dtype))


@torch.no_grad()
def update_l1_coefficient(coefficient: Tensor, routing: Routing, top_k: int, alpha: float) -> None:
    """lambda <- lambda * alpha ** sign(a - K) in place, a the mean number of active experts
    per real token of ``routing`` (no change for a call without real tokens)."""
    coefficient.mul_(l1_coefficient_factor(routing, top_k, alpha, coefficient))


def remoe_penalty(router, routing: Routing, training: bool) -> tuple[Tensor, Tensor]:
    """-> (lambda * L1, L1) for one call of a ``routing="remoe"`` router, with lambda the
    router's ``l1_coefficient`` before this call; then, in training mode, updates lambda from
    this call's mean active experts (:func:`moegrad.routing.update_running_state`: not in
    activation checkpointing's re-run, and under torch.compile without a graph break).

    Checkpointing re-runs a training call inside its backward, after the update: the re-run
    takes ``l1_previous`` (lambda before the last update, kept exactly), the lambda its forward
    used, so the penalty's gradient is the forward's. That holds when each call's backward
    comes before the next training call (one forward and backward per micro-batch, gradient
    accumulation included); a schedule that runs several checkpointed forwards of a layer
    before their backwards would see the later updates."""
    top_k = router.config.top_k
    l1 = remoe_l1_loss(routing, top_k)
    # snapshots: under torch.compile the backward must not re-read the buffers updated below
    coefficient, previous = snapshot(router.l1_coefficient), snapshot(router.l1_previous)
    if training:
        # True in checkpointing's re-run (tested at run time, also under torch.compile)
        rerun = unless_recomputing(torch.ones((), device=coefficient.device), 0.0) == 0
        current = coefficient
        coefficient = torch.where(rerun, previous, current)
        factor = l1_coefficient_factor(routing, top_k, router.config.l1_alpha, router.l1_coefficient)
        update_running_state(router.l1_previous, current, "copy")
        update_running_state(router.l1_coefficient, factor, "mul")
    return coefficient * l1, l1

__all__ = ["remoe_l1_loss", "l1_coefficient_factor", "update_l1_coefficient", "remoe_penalty"]
