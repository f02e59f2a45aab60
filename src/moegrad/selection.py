"""The shared selection and weighting rules an estimator routes with.

Shapes: T tokens, E experts, K top-k, G = ``n_group`` expert groups of E / G experts.

    choice = s + b                       [T, E]  b: the optional selection-only bias
    group-limited top-k (DeepSeek-V3):   keep the ``topk_group`` groups whose two best choices
                                         sum highest, the other experts get -inf
    S = TopK(choice)                     [T, K]  (:meth:`Selection.select_topk`, no gradient)
    w_i = c * s_i (/ sum_S s + 1e-20)    [T, K]  c = routed_scaling_factor, the division with
                                         ``normalize=True`` (:meth:`Selection.combine_weights`)

The router (:class:`moegrad.Router`, and the HF adapter's router) builds one :class:`Selection`
per call from its configuration and its bias buffer and hands it to the estimator's
``route(x, z, scores, selection)``: the estimator gets these rules, not the router module.
A :class:`Selection` also has the router's ``config``, ``bias``, ``num_experts`` and ``top_k``,
so a user estimator written when ``route`` received the router keeps working if it reads only
those and ``select_topk`` / ``combine_weights``; other router attributes (``gate``,
``training``, ``load_counts``) are not passed any more (AttributeError naming ``Selection``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from moegrad._spec import RouterConfig, RouterViews

__all__ = ["Selection"]


@dataclass(frozen=True, eq=False)
class Selection(RouterViews):
    """``config``: the router's :class:`~moegrad.routing.RouterConfig`; ``bias``: [E] fp32
    selection-only bias (auxiliary-loss-free balancing; it changes S, never the weights) or None."""

    config: RouterConfig
    bias: Optional[Tensor] = None

    @torch.no_grad()
    def select_topk(self, scores: Tensor) -> Tensor:
        """Deterministic selection: [T, E] scores -> [T, K] int64 indices (descending score).

        Adds the selection-only bias, applies group-limited top-k, then takes the top-k.
        """
        c = self.config
        choice = scores if self.bias is None else scores + self.bias
        if c.grouped and choice.shape[0]:
            t = choice.shape[0]
            per_group = c.num_experts // c.n_group
            grouped = choice.view(t, c.n_group, per_group)
            best = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)  # [T, n_group]
            keep_groups = best.topk(c.topk_group, dim=-1).indices
            keep = torch.zeros(t, c.n_group, dtype=torch.bool, device=choice.device)
            keep.scatter_(1, keep_groups, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(t, c.num_experts)
        return choice.topk(c.top_k, dim=-1).indices

    def combine_weights(self, scores: Tensor, indices: Tensor) -> Tensor:
        """[T, E] scores, [T, K] indices -> [T, K] weights w = c * s_S (/ sum s_S if normalize)."""
        w = scores.gather(1, indices)
        if self.config.normalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        if self.config.routed_scaling_factor != 1.0:
            w = w * self.config.routed_scaling_factor
        return w
