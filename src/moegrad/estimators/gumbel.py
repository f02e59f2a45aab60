"""Gumbel-top-k with a relaxed softmax (Jang et al. 2017; Kool et al. 2019)."""

from __future__ import annotations

import torch

from moegrad.estimators.base import Estimator, Picked


class Gumbel(Estimator):
    """``gumbel``: sample S = TopK((z + G) / tau), G ~ Gumbel(0, 1), in training mode.

    Forward: p = softmax((z + G) / tau) over all E experts; S = TopK(p) (the Gumbel-top-k
    sample of K experts without replacement); soft weights w_i = c * p_i for i in S
    (renormalised over S if ``normalize``). ``hard=True`` uses unit weights c in the forward
    and the soft weights' gradient: w = c * (1 + p_S - sg(p_S)) (straight-through).
    Router gradient: autograd through the relaxed softmax, dL/dz_j = sum_{i in S}
    <g, e_i> c dp_i/dz_j with dp_i/dz_j = p_i (delta_ij - p_j) / tau, for every expert j.
    As tau -> 0 the soft weights tend to hard top-1 over S (weight 1 on the best sample).
    Eval mode: G = 0, so S is the deterministic top-k of the scores.

    Options: ``tau`` > 0 (default 1.0), ``hard`` (default False), ``generator``.
    """

    name = "gumbel"
    def route(self, x, z, scores, selection) -> Picked:
        perturbed = z + self._gumbel(z) if self.training else z
        p = torch.softmax(perturbed / self.tau, dim=-1)  # [T, E]
        indices = p.detach().topk(self.config.top_k, dim=-1).indices
        w = p.gather(1, indices)
        if self.config.normalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        if self.hard:
            w = (w - w.detach()) + 1.0  # exactly 1 forward
        c = self.config.routed_scaling_factor
        return Picked(indices, w * c if c != 1.0 else w)
