"""``moegrad.mlx.topk``: torch.topk for MLX (values sorted descending, differentiable values,
integer indices that need no stop_gradient)."""

from __future__ import annotations

import pytest

from tests.mlx import need  # noqa: E402

mx = need("mlx.core")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moegrad import mlx as mgx  # noqa: E402
from tests.mlx.mlx_helpers import max_diff, to_mx  # noqa: E402


@pytest.mark.parametrize("shape,k,axis,largest", [
    ((7,), 3, -1, True), ((4, 9), 9, -1, True), ((3, 5, 40), 4, 1, True),
    ((3, 40, 5), 2, -2, False), ((2, 1000), 5, -1, True), ((2, 1000), 7, 1, False),
])
def test_topk_matches_torch_values_indices_and_gradient(shape, k, axis, largest):
    x = torch.randn(*shape, requires_grad=True)
    weight = torch.randn(*[k if d == axis % len(shape) else n for d, n in enumerate(shape)])
    tv, ti = torch.topk(x, k, dim=axis, largest=largest)
    (tv * weight).sum().backward()
    mv, mi = mgx.topk(to_mx(x), k, axis=axis, largest=largest)
    assert mi.dtype == mx.uint32
    assert np.array_equal(np.array(mi), ti.numpy())
    assert max_diff(mv, tv) == 0
    grad = mx.grad(lambda v: (mgx.topk(v, k, axis=axis, largest=largest)[0] * to_mx(weight)).sum())(to_mx(x))
    assert max_diff(grad, x.grad) == 0
    assert int((np.array(grad) != 0).sum()) == int(np.prod(weight.shape))


def test_topk_ties_keep_the_lower_index_first():
    v, i = mgx.topk(mx.array([1.0, 3.0, 3.0, 2.0, 3.0]), 3)
    assert np.array(i).tolist() == [1, 2, 4]
    assert np.array(v).tolist() == [3.0, 3.0, 3.0]


def test_topk_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k=6"):
        mgx.topk(mx.zeros((5,)), 6)
    with pytest.raises(TypeError, match="k must be an int"):
        mgx.topk(mx.zeros((5,)), 2.0)
    with pytest.raises(TypeError, match="mlx.core.array"):
        mgx.topk(np.zeros(5), 2)
    with pytest.raises(ValueError, match="axis=2"):
        mgx.topk(mx.zeros((5, 3)), 2, axis=2)
