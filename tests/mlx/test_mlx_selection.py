"""moegrad.mlx.selection: the Selection the router hands to its estimator (config + selection
bias) selects and weighs exactly as the router's own methods, and a user's estimator reads it."""

from __future__ import annotations

import numpy as np

from tests.mlx import need

mx = need("mlx.core")

from moegrad import mlx as mgx  # noqa: E402
from moegrad._spec import RouterConfig  # noqa: E402
from moegrad.mlx.estimators import Estimator, Picked  # noqa: E402
from moegrad.mlx.selection import Selection  # noqa: E402


def test_selection_adds_the_bias_groups_and_weighs_like_the_router():
    router = mgx.Router(4, 6, 2, normalize=True, routed_scaling_factor=2.0, n_group=3,
                        topk_group=2, selection_bias=True)
    router.bias = mx.array([0.0, 0.0, 0.0, 0.0, 0.5, 0.0])
    scores = mx.array([[0.30, 0.25, 0.20, 0.15, 0.05, 0.05],
                       [0.05, 0.10, 0.40, 0.05, 0.20, 0.20]])
    sel = router.selection()
    assert sel.config is router.config and sel.bias is router.bias
    # groups {0,1} {2,3} {4,5}, biased group sums: row 0 0.55, 0.35, 0.60 -> groups 0 and 2;
    # row 1 0.15, 0.45, 0.90 -> groups 1 and 2; then the top-2 biased scores inside them
    assert np.array(sel.select_topk(scores)).tolist() == [[4, 0], [4, 2]]
    assert np.array(router.select_topk(scores)).tolist() == [[4, 0], [4, 2]]
    w = sel.combine_weights(scores, sel.select_topk(scores))  # c * s / sum_S s, unbiased s
    assert np.allclose(np.array(w), [[2 * 0.05 / 0.35, 2 * 0.30 / 0.35],
                                     [2 * 0.20 / 0.60, 2 * 0.40 / 0.60]], atol=1e-6)
    plain = Selection(RouterConfig(4, 6, 2))
    assert np.array(plain.select_topk(scores)).tolist() == [[0, 1], [2, 4]]
    assert np.allclose(np.array(plain.combine_weights(scores, plain.select_topk(scores))),
                       [[0.30, 0.25], [0.40, 0.20]], atol=1e-7)


class HalfTopK(Estimator):
    """A user's estimator: top-k through the Selection's own names, half weights."""

    name = "half_topk"

    def route(self, x, z, scores, selection) -> Picked:
        indices = selection.select_topk(scores)
        c = selection.config.routed_scaling_factor
        return Picked(indices, 0.5 * c * selection.combine_weights(scores, indices) / c)


def test_a_users_estimator_routes_through_the_selection():
    router = mgx.Router(4, 5, 2)
    router.estimator = HalfTopK(router.config)
    x = mx.random.normal((7, 4), key=mx.random.key(0))
    r = router(x)
    s = np.array(r.scores)
    ref = np.argsort(-s, axis=1, kind="stable")[:, :2]
    assert np.array(r.indices).tolist() == ref.tolist()
    assert np.allclose(np.array(r.weights), 0.5 * np.take_along_axis(s, ref, 1), atol=1e-7)
