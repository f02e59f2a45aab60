"""ReMoE's L1 penalty and its adaptive coefficient in MLX (``routing="remoe"``): the maths,
the paper and the differences from it are :mod:`moegrad.remoe`'s.

    L1 = (1 / T_r) * sum_t sum_e f_e g_te,   f_e = E / (K T_r) * sum_t A_te   (no gradient)
    lambda <- lambda * alpha ** sign(a - K)  after each training call, a = mean active experts
"""

from __future__ import annotations

import mlx.core as mx

from moegrad.mlx.routing import Routing


def remoe_l1_loss(routing: Routing, top_k: int) -> mx.array:
    """The load-balanced L1 penalty of a ReMoE call (``routing.weights`` the gates g [T, E],
    ``routing.chosen`` the active pairs) -> 0-d fp32; 0 without real tokens."""
    gates, active = routing.weights, routing.chosen
    num_experts = gates.shape[1]
    real = gates.shape[0] if routing.mask is None else routing.mask.astype(mx.float32).sum()
    real = mx.maximum(mx.array(real, dtype=mx.float32), 1.0)
    load = mx.stop_gradient(active.astype(mx.float32).sum(0) * (num_experts / top_k) / real)  # f [E]
    return (gates * load).sum() / real


def updated_l1_coefficient(coefficient: mx.array, routing: Routing, top_k: int, alpha: float) -> mx.array:
    """lambda * alpha ** sign(a - K), a the mean active experts per real token of ``routing``
    (lambda unchanged for a call without real tokens)."""
    real = routing.chosen.shape[0] if routing.mask is None else routing.mask.astype(mx.float32).sum()
    real = mx.array(real, dtype=mx.float32)
    mean_active = routing.chosen.astype(mx.float32).sum() / mx.maximum(real, 1.0)
    step = mx.sign(mean_active - top_k) * (real > 0)
    return mx.stop_gradient(coefficient * mx.power(mx.array(alpha, dtype=mx.float32), step))


def remoe_penalty(router, routing: Routing, training: bool) -> tuple[mx.array, mx.array]:
    """-> (lambda * L1, L1) with lambda the router's ``l1_coefficient`` before this call; in
    training mode the router's lambda is then updated from this call's mean active experts."""
    top_k = router.config.top_k
    l1 = remoe_l1_loss(routing, top_k)
    penalty = mx.stop_gradient(router.l1_coefficient) * l1
    if training:
        router.l1_coefficient = updated_l1_coefficient(router.l1_coefficient, routing, top_k,
                                                       router.config.l1_alpha)
    return penalty, l1


__all__ = ["remoe_l1_loss", "updated_l1_coefficient", "remoe_penalty"]
