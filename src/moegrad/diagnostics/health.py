"""Routing health: is the router spreading tokens, is it decided, does it find the structure?

Shapes: T tokens, E experts, K top-k, C ground-truth classes.

    load_i        = (pairs routed to i) / (all pairs)           sums to 1 over experts
    load CV       = std(load) / mean(load)                      population std; 0 = balanced
    max violation = max_i load_i / mean(load) - 1               (MaxVio, Wang et al. 2024)
    entropy       = mean_t H(s'_t) / log E                      s' scores normalised to sum 1;
                                                                1 = uniform, 0 = one-hot
    purity        = sum_i max_c n(i, c) / T                     n(i, c): tokens of class c whose
                                                                first choice is expert i
    dead experts  = experts that received no token over the last ``window`` steps

Purity is 1 when every expert serves a single class (each class may use several experts) and
equals the largest class share (1/C for balanced classes) when one expert takes everything.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch
from torch import Tensor

from moegrad._checks import check_int


def expert_load(indices: Tensor, num_experts: int, mask: Optional[Tensor] = None) -> Tensor:
    """indices [T, K] int64 (mask [T] bool, True = real token) -> [E] float64 load fractions."""
    check_int("num_experts", num_experts, 1)
    rows = indices if mask is None else indices[mask]
    counts = torch.bincount(rows.reshape(-1).cpu(), minlength=num_experts).double()
    total = counts.sum()
    return counts / total if float(total) > 0 else counts


def load_cv(load: Tensor) -> float:
    """Coefficient of variation std/mean of a load (or count) vector [E]; 0 when balanced."""
    load = load.double()
    mean = load.mean()
    return float(load.std(unbiased=False) / mean) if float(mean) > 0 else 0.0


def max_violation(load: Tensor) -> float:
    """max_i load_i / mean(load) - 1 for a load (or count) vector [E]; 0 when balanced."""
    load = load.double()
    mean = load.mean()
    return float(load.max() / mean - 1.0) if float(mean) > 0 else 0.0


def token_entropy(scores: Tensor) -> Tensor:
    """scores [T, E] -> [T] float64 normalised entropy H(s'_t) / log E of each token's scores
    (s' = s / sum_e s, detached; 0 for E < 2). Static shapes: it traces under torch.compile."""
    s = scores.detach().double()
    if s.shape[-1] < 2:
        return s.new_zeros(s.shape[0])
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-300)
    return -(p * p.clamp_min(1e-300).log()).sum(-1) / math.log(s.shape[-1])


def router_entropy(scores: Tensor) -> float:
    """Mean normalised entropy of the per-token score distribution, scores [T, E] -> [0, 1]
    (the mean of :func:`token_entropy`; 0 for no token)."""
    return float(token_entropy(scores).mean()) if scores.shape[0] else 0.0


def purity(first_choice: Tensor, truth: Tensor, num_experts: int, num_classes: int) -> float:
    """first_choice [T] expert ids, truth [T] class ids -> sum_i max_c n(i, c) / T."""
    check_int("num_experts", num_experts, 1)
    check_int("num_classes", num_classes, 1)
    if first_choice.shape != truth.shape or first_choice.dim() != 1:
        raise ValueError(f"first_choice and truth must both be [T]; got {tuple(first_choice.shape)} "
                         f"and {tuple(truth.shape)}")
    if first_choice.numel() == 0:
        return 0.0
    joint = torch.zeros(num_experts, num_classes, dtype=torch.int64)
    joint.index_put_((first_choice.cpu().long(), truth.cpu().long()),
                     torch.ones(truth.numel(), dtype=torch.int64), accumulate=True)
    return float(joint.max(1).values.sum()) / truth.numel()


def confusion(first_choice: Tensor, truth: Tensor, num_experts: int, num_classes: int) -> Tensor:
    """[E, C] int64 token counts n(i, c) of first choice i and class c."""
    joint = torch.zeros(num_experts, num_classes, dtype=torch.int64)
    joint.index_put_((first_choice.cpu().long(), truth.cpu().long()),
                     torch.ones(truth.numel(), dtype=torch.int64), accumulate=True)
    return joint


class LoadWindow:
    """Per-expert token counts over the last ``window`` steps; ``dead`` counts the experts that
    got nothing in that window (only meaningful once ``full``)."""

    def __init__(self, num_experts: int, window: int = 50) -> None:
        check_int("num_experts", num_experts, 1)
        check_int("window", window, 1)
        self.num_experts, self.window = num_experts, window
        self._steps: deque = deque(maxlen=window)

    def update(self, counts: Tensor) -> None:
        """counts [E] (token, slot) pairs routed to each expert at one step."""
        if counts.shape != (self.num_experts,):
            raise ValueError(f"counts must have shape [{self.num_experts}], got {tuple(counts.shape)}")
        self._steps.append(counts.detach().cpu().long().clone())

    @property
    def full(self) -> bool:
        return len(self._steps) == self.window

    @property
    def counts(self) -> Tensor:
        if not self._steps:
            return torch.zeros(self.num_experts, dtype=torch.int64)
        return torch.stack(list(self._steps)).sum(0)

    @property
    def dead(self) -> int:
        return int((self.counts == 0).sum()) if self._steps else 0


def routing_health(routing, truth: Optional[Tensor] = None, num_classes: Optional[int] = None) -> dict:
    """Health of one :class:`moegrad.Routing`: load [E] (list), load_cv, max_violation,
    entropy, idle (experts with no token in this batch) and, given truth [T] class ids,
    purity. Under ``routing="expert_choice"`` the load is that of the chosen pairs
    (``routing.chosen``) and purity, which needs each token's first expert, is not defined."""
    num_experts = routing.logits.shape[-1]
    chosen = routing.chosen  # [T, E] bool under expert choice, else None
    if chosen is None:
        load = expert_load(routing.indices, num_experts, routing.mask)
    else:
        counts = chosen.sum(0).double()
        load = counts / counts.sum().clamp_min(1)
    out = {"load": load.tolist(), "load_cv": load_cv(load), "max_violation": max_violation(load),
           "entropy": router_entropy(routing.scores if routing.mask is None else routing.scores[routing.mask]),
           "idle": int((load == 0).sum())}
    if truth is not None and chosen is not None:
        raise ValueError("routing_health(truth=...): purity needs each token's first expert, which "
                         "routing='expert_choice' does not give; pass truth=None")
    if truth is not None:
        classes = int(truth.max()) + 1 if num_classes is None else num_classes
        out["purity"] = purity(routing.indices[:, 0], truth.reshape(-1), num_experts, classes)
    return out
