"""Reading a Routing as the study's metrics do: each token's top expert, purity, active experts."""

import pytest
import torch

from moegrad.routing import Routing
from moegrad.study.task import active_experts, routed_purity, top_expert


def pair_routing(mask=None) -> Routing:
    """4 tokens, 3 experts, chosen pairs as expert choice / ReMoE give them (token 2: none)."""
    scores = torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.9, 0.3], [0.0, 0.0, 0.0], [0.4, 0.6, 0.7]])
    chosen = torch.tensor([[True, True, False], [True, False, True], [False, False, False],
                           [False, False, True]])
    indices = torch.arange(3).expand(4, 3)
    return Routing(logits=scores.log(), scores=scores, indices=indices, weights=scores * chosen,
                   shape=(4,), mask=mask, chosen=chosen)


def test_top_expert_is_the_highest_score_chosen_pair_and_none_for_an_untaken_token():
    expert, routed = top_expert(pair_routing())
    # token 1: expert 1 scores 0.9 but was not chosen, so 2 (0.3) beats 0 (0.1)
    assert expert.tolist() == [0, 2, 0, 2]
    assert routed.tolist() == [True, True, False, True]


def test_purity_counts_an_untaken_token_as_impure():
    truth = torch.tensor([0, 1, 1, 0])
    # routed: token 0 -> expert 0 (class 0); tokens 1, 3 -> expert 2 (classes 1, 0)
    # sum over experts of the majority count = 1 + 1 = 2, over all 4 tokens
    assert routed_purity(pair_routing(), truth, 3, 2) == pytest.approx(2 / 4)
    assert routed_purity(pair_routing(), torch.tensor([0, 1, 1, 1]), 3, 2) == pytest.approx(3 / 4)


def test_active_experts_counts_chosen_pairs_of_real_tokens():
    assert active_experts(pair_routing()) == pytest.approx((2 + 2 + 0 + 1) / 4)
    mask = torch.tensor([True, True, False, True])
    assert active_experts(pair_routing(mask)) == pytest.approx((2 + 2 + 1) / 3)


def test_token_choice_reads_the_first_of_k_and_counts_k():
    scores = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
    indices = torch.tensor([[2, 1], [1, 2]])
    r = Routing(logits=scores.log(), scores=scores, indices=indices,
                weights=scores.gather(1, indices), shape=(2,))
    expert, routed = top_expert(r)
    assert expert.tolist() == [2, 1] and routed.all()
    assert active_experts(r) == 2.0
    assert routed_purity(r, torch.tensor([0, 0]), 3, 1) == 1.0
    assert routed_purity(r, torch.tensor([0, 1]), 3, 2) == 1.0
