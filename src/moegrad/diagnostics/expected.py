"""The exact expected loss of a sampled top-k policy, by enumerating every expert subset.

Shapes: T tokens, D model dim, E experts, K top-k, M = C(E, K) unordered subsets.

The policy draws K experts without replacement from p = softmax(z / tau) (Plackett-Luce, the
law of Gumbel-top-k): an ordered draw (i_1, ..., i_K) has probability
prod_j p_{i_j} / (1 - sum_{l<j} p_{i_l}), and a set S the sum over its K! orders.

Given S, the layer output is y_S = sum_{i in S} w_i e_i under one of two forward weight rules
(``weights``), chosen to match the estimator being measured:

* ``"score"``: w_i = c * s_i (``normalize=False``) or c * s_i / sum_{j in S} s_j
  (``normalize=True``), where s = softmax(z) or sigmoid(z) are the scores and c the routed
  scaling factor, i.e. exactly the weights of the ``topk`` estimator on the subset S;
* ``"unit"``: w_i = c, the forward of ``straight_through``, ``unweighted`` (c = 1) and
  ``gumbel`` with ``hard=True``. y_S does not depend on z, so the gradient flows only through
  the subset probabilities P(S; z) (the score-function term).

The objective is

    J(z) = mean_t sum_S P_t(S; z) L_t(y_{t,S}(z))

and its gradient (score-function part + pathwise part) is taken by autograd through the
enumeration, exactly. As tau -> 0 the policy becomes the deterministic top-k of z.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
from torch import Tensor

from moegrad._checks import check_choice, check_float, check_int

#: refuse enumerations larger than this many ordered draws (E! / (E-K)!)
MAX_ORDERED = 20_000

#: forward weight rules of the enumerated layer output y_S (see the module docstring)
WEIGHT_RULES = ("score", "unit")


def subsets(num_experts: int, top_k: int) -> Tensor:
    """[M, K] int64: every K-subset of range(E), in lexicographic order."""
    check_int("num_experts", num_experts, 1)
    check_int("top_k", top_k, 1, num_experts)
    return torch.tensor(list(itertools.combinations(range(num_experts), top_k)), dtype=torch.int64)


def subset_probabilities(a: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """a [T, E] policy logits (z / tau) -> (subsets [M, K], probs [T, M]).

    probs[t, m] = P(S = subsets[m]) for K draws without replacement from softmax(a[t]); rows
    sum to 1. Each draw's normaliser is a logsumexp over the experts not yet drawn (never
    1 - sum of drawn probabilities, which cancels catastrophically when p is nearly one-hot).
    """
    num_experts = a.shape[-1]
    check_int("top_k", top_k, 1, num_experts)
    ordered = math.perm(num_experts, top_k)
    if ordered > MAX_ORDERED:
        raise ValueError(f"enumerating top_k={top_k} of num_experts={num_experts} needs {ordered} "
                         f"ordered draws (more than {MAX_ORDERED}); use a smaller problem")
    sets = subsets(num_experts, top_k)
    position = {tuple(s): m for m, s in enumerate(sets.tolist())}
    perms = torch.tensor(list(itertools.permutations(range(num_experts), top_k)),
                         dtype=torch.int64)  # [P, K]
    drawn = torch.zeros(perms.shape[0], top_k, num_experts, dtype=torch.bool)  # drawn before j
    for j in range(1, top_k):
        drawn[:, j] = drawn[:, j - 1]
        drawn[torch.arange(perms.shape[0]), j, perms[:, j - 1]] = True
    free = torch.zeros(drawn.shape, dtype=a.dtype).masked_fill(drawn, float("-inf"))
    log_norm = torch.logsumexp(a[:, None, None, :] + free, dim=-1)  # [T, P, K]
    log_ordered = (a[:, perms] - log_norm).sum(-1)  # [T, P]
    target = torch.tensor([position[tuple(sorted(q))] for q in perms.tolist()], dtype=torch.int64)
    probs = a.new_zeros(a.shape[0], sets.shape[0]).index_add(1, target, log_ordered.exp())
    return sets, probs


def subset_weights(scores: Tensor, sets: Tensor, normalize: bool, scale: float = 1.0,
                   weights: str = "score") -> Tensor:
    """scores [T, E], sets [M, K] -> [T, M, K] combine weights of each subset.

    ``weights="score"``: w = c * s_S (/ sum s_S if ``normalize``), topk's rule;
    ``weights="unit"``: w = c for every selected expert (``normalize`` does not apply).
    """
    check_choice("weights", weights, WEIGHT_RULES)
    if weights == "unit":
        return scores.new_full((scores.shape[0], *sets.shape), float(scale))
    w = scores[:, sets]  # [T, M, K]
    if normalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale


def _score(z: Tensor, score: str) -> Tensor:
    check_choice("score", score, ("sigmoid", "softmax"))
    return torch.sigmoid(z) if score == "sigmoid" else torch.softmax(z, dim=-1)


def expected_loss(z: Tensor, expert_outputs: Tensor, loss_fn: Callable[[Tensor], Tensor],
                  top_k: int, *, tau: float = 1.0, score: str = "softmax",
                  normalize: bool = False, scale: float = 1.0, weights: str = "score") -> Tensor:
    """J(z) = mean_t E_{S ~ PL(softmax(z_t / tau))} L_t(sum_{i in S} w_i(z_t) e_{t,i}).

    z [T, E] router logits (after the router temperature), expert_outputs e [T, E, D],
    ``loss_fn(y [T, D]) -> [T]`` per-token losses; ``weights`` the forward weight rule
    ("score": w_i = c * s_i, renormalised over S if ``normalize``; "unit": w_i = c).
    Returns a scalar; differentiable in z (and in e). Every subset is evaluated, so the cost
    is C(E, K) calls of ``loss_fn``.
    """
    check_float("tau", tau, low=0.0, low_open=True)
    check_choice("weights", weights, WEIGHT_RULES)
    if z.dim() != 2 or expert_outputs.dim() != 3 or expert_outputs.shape[:2] != z.shape:
        raise ValueError(f"z must be [T, E] and expert_outputs [T, E, D]; got {tuple(z.shape)} "
                         f"and {tuple(expert_outputs.shape)}")
    sets, probs = subset_probabilities(z / tau, top_k)
    w = subset_weights(_score(z, score), sets, normalize, scale, weights)  # [T, M, K]
    total = z.new_zeros(z.shape[0])
    for m in range(sets.shape[0]):
        y = torch.einsum("tk,tkd->td", w[:, m], expert_outputs[:, sets[m]])
        losses = loss_fn(y)
        if losses.shape != (z.shape[0],):
            raise ValueError(f"loss_fn must return per-token losses of shape [{z.shape[0]}], "
                             f"got {tuple(losses.shape)}")
        total = total + probs[:, m] * losses
    return total.mean()


def dense_mixture_loss(z: Tensor, expert_outputs: Tensor, loss_fn: Callable[[Tensor], Tensor], *,
                       score: str = "softmax", scale: float = 1.0) -> Tensor:
    """J_dense(z) = mean_t L_t(c * sum_i s_{t,i} e_{t,i}): the loss of the dense mixture."""
    y = torch.einsum("te,ted->td", _score(z, score) * scale, expert_outputs)
    return loss_fn(y).mean()
