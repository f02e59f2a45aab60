"""moegrad.selection: the top-k selection and combine weights an estimator routes with.

Shapes: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import pytest
import torch

import moegrad
from moegrad.estimators import Estimator, Picked
from moegrad.selection import Selection


def _reference_topk(scores, bias, n_group, topk_group, k):
    """Group-limited top-k written out token by token (DeepSeek-V3's rule)."""
    out = []
    for s in scores + (0 if bias is None else bias):
        if n_group:
            groups = s.view(n_group, -1)
            best = groups.topk(2, dim=-1).values.sum(-1)
            keep = set(best.topk(topk_group).indices.tolist())
            s = torch.stack([v if i // groups.shape[1] in keep else torch.tensor(float("-inf"))
                             for i, v in enumerate(s)])
        out.append(s.topk(k).indices)
    return torch.stack(out)


@pytest.mark.parametrize("grouped", [False, True])
def test_selection_equals_the_written_out_rule_and_the_router_delegates_to_it(grouped):
    gen = torch.Generator().manual_seed(0)
    kw = dict(n_group=4, topk_group=2) if grouped else {}
    router = moegrad.Router(6, 8, 3, score="sigmoid", normalize=True, routed_scaling_factor=2.5,
                            selection_bias=True, **kw)
    router.bias.copy_(torch.randn(8, generator=gen) * 0.3)
    scores = torch.rand(11, 8, generator=gen)
    sel = router.selection()
    assert isinstance(sel, Selection) and sel.bias is router.bias and sel.config is router.config
    indices = sel.select_topk(scores)
    expect = _reference_topk(scores, router.bias, kw.get("n_group"), kw.get("topk_group"), 3)
    assert torch.equal(indices, expect) and torch.equal(router.select_topk(scores), expect)
    w = sel.combine_weights(scores, indices)
    s = scores.gather(1, indices)
    torch.testing.assert_close(w, 2.5 * s / s.sum(-1, keepdim=True))
    torch.testing.assert_close(router.combine_weights(scores, indices), w)
    assert (sel.num_experts, sel.top_k) == (8, 3)


def test_an_estimator_written_against_the_router_names_works_with_a_selection():
    """route() once received the router; an estimator reading config, num_experts, top_k,
    select_topk and combine_weights gives the same routing with a Selection."""

    class Halved(Estimator):
        name = "halved_test"

        def route(self, x, z, scores, router):
            assert router.num_experts == router.config.num_experts and router.top_k == 2
            indices = router.select_topk(scores)
            return Picked(indices, router.combine_weights(scores, indices) / 2)

    torch.manual_seed(0)
    router = moegrad.Router(4, 5, 2)
    router.estimator = Halved(router.config)
    x = torch.randn(7, 4)
    r = router(x)
    s = torch.softmax(router.gate(x), -1)
    top = s.topk(2, dim=-1)
    assert torch.equal(r.indices, top.indices)
    torch.testing.assert_close(r.weights, top.values / 2)
    with pytest.raises(AttributeError, match="Selection"):
        _ = router.selection().gate
