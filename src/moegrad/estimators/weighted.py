"""Estimators that keep the deterministic top-k and differ only in the combine weights.

Notation per token: s [E] scores, S the K selected experts, e_i = E_i(x) expert outputs,
g = dL/dy, c = routed_scaling_factor.
"""

from __future__ import annotations

import torch

from moegrad.estimators.base import Estimator, Picked


class TopK(Estimator):
    """``topk``: what torch.topk + gather gives (Mixtral; its backward is the
    one written out by hand on Zhihu, zhihu.com/question/11071292653).

    Forward: y = sum_{i in S} w_i e_i with w = c * s_S (renormalised over S if ``normalize``).
    Router gradient: plain autograd, dL/ds_i = <g, e_i> * dw/ds_i for i in S and 0 otherwise,
    then through the softmax/sigmoid to all logits. With K=1 and ``normalize=True`` the weight
    is the constant c, so the router receives no task gradient at all.
    """

    name = "topk"

    def route(self, x, z, scores, selection) -> Picked:
        indices = selection.select_topk(scores)
        return Picked(indices, selection.combine_weights(scores, indices))


class Unweighted(Estimator):
    """``unweighted``: y = sum_{i in S} e_i, the weights are constant ones.

    Router gradient: none (the router learns only from balance losses). A control that shows
    why the multiplication by the gate matters (ml-explore/mlx#652). ``normalize`` and
    ``routed_scaling_factor`` do not apply.
    """

    name = "unweighted"

    def route(self, x, z, scores, selection) -> Picked:
        indices = selection.select_topk(scores)
        return Picked(indices, torch.ones(indices.shape, dtype=scores.dtype, device=scores.device))


class StraightThrough(Estimator):
    """``straight_through``: unit weights forward, gradient as if y = c * sum_{i in S} s_i e_i.

    Weights w_i = c * (1 + s_i - sg(s_i)) (value c, derivative c): dL/ds_i = c <g, e_i> for
    i in S, 0 otherwise. This is ``y * (gw - stop_gradient(gw + 1))`` from the MLX issue
    ml-explore/mlx#652 with the sign corrected (that form negates the output). The raw scores are used, so ``normalize``
    does not change the gradient (top-1 renormalised still trains the router).
    """

    name = "straight_through"

    def route(self, x, z, scores, selection) -> Picked:
        indices = selection.select_topk(scores)
        s = scores.gather(1, indices)
        w = (s - s.detach()) + 1.0  # exactly 1 forward
        c = selection.config.routed_scaling_factor
        return Picked(indices, w * c if c != 1.0 else w)
