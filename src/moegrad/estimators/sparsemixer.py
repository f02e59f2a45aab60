"""SparseMixer-v2 as used in GRIN / PhiMoE (Liu et al. 2023; Liu et al. 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from moegrad.estimators.base import Estimator, Picked


class SparseMixer(Estimator):
    """``sparsemixer``: K picks, each a masked Gumbel-max sample with a Heun-rule multiplier.

    Pick j works on z^(j), the logits with earlier picks set to -inf. With M = max z^(j):

    * mask: drop expert i where (M - z_i) / max(|z_i|, M) > 2 * jitter_eps;
    * p = softmax of the masked z^(j); D = argmax(masked z^(j) + G), G ~ Gumbel (training), or
      D = argmax z^(j) (eval);
    * forward weight m * p_D, with m = 1 if D is the argmax of p or with probability 1/4,
      else m = 1/3 (Heun's third-order rule as GRIN implements it); eval: m = 1.

    Router gradient: that of h = p_D e_D alone: w = p_D + sg(m p_D - p_D), so
    dL/dz_i = <g, e_D> p_D (delta_iD - p_i), the row D of the masked softmax's Jacobian
    (zero for masked experts; so zero altogether when the mask keeps only D, as happens with
    small, spread-out logits and a small ``jitter_eps``). The experts see the forward weight m p_D, as in transformers'
    PhiMoE reference. The weights are the method's own: ``normalize`` and ``score`` do not change
    them; ``routed_scaling_factor`` multiplies them.

    Options: ``jitter_eps`` >= 0 (default 0.01), ``generator``.
    """

    name = "sparsemixer"
    def route(self, x, z, scores, selection) -> Picked:
        current = z
        picks, weights = [], []
        for _ in range(self.config.top_k):
            masked, top = self._mask(current, z)
            p = torch.softmax(masked, dim=-1)
            if self.training:
                pick = (masked.detach() + self._gumbel(masked)).argmax(-1, keepdim=True)
                lucky = self._uniform(p[:, :1]) < 0.25
                m = torch.where((pick == top) | lucky, 1.0, 1.0 / 3.0)
                p_pick = p.gather(1, pick)
                w = p_pick + (m * p_pick - p_pick).detach()
            else:
                pick = top
                w = p.gather(1, pick)
            picks.append(pick)
            weights.append(w)
            current = current.scatter(1, pick, float("-inf"))
        w = torch.cat(weights, dim=1)
        c = self.config.routed_scaling_factor
        return Picked(torch.cat(picks, dim=1), w * c if c != 1.0 else w)

    def _mask(self, current: Tensor, z: Tensor):
        """current [T, E] (earlier picks at -inf), z [T, E] -> masked logits, argmax [T, 1]."""
        with torch.no_grad():
            best, top = current.max(dim=-1, keepdim=True)
            factor = z.abs().clamp(min=best)
            drop = (best - z) / factor > 2 * self.jitter_eps
        return current.masked_fill(drop, float("-inf")), top
