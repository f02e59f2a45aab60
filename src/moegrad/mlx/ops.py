"""Small MLX operations the routers build on: a differentiable ``topk`` and noise sources.

Shapes: T tokens, E experts, K top-k; ``x`` in :func:`topk` is any shape [..., n].

MLX has no gradient through indices (``argpartition``/``argsort`` raise when a gradient reaches
them) and ``mx.topk`` returns values only, in ascending order. :func:`topk` gives what
``torch.topk`` gives: values sorted descending whose gradient reaches the selected entries (and
nothing else), plus the integer indices, already wrapped in ``mx.stop_gradient``.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx

from moegrad._checks import check_int

#: smallest normal float32 and float32 machine epsilon, the clamps of the uniform noise
TINY = 1.1754943508222875e-38
EPS = 1.1920928955078125e-07


def topk_indices(x: mx.array, k: int, largest: bool = True) -> mx.array:
    """[..., n] -> [..., k] uint32 indices of the k largest (smallest) entries along the last axis,
    ordered by value (descending for ``largest``); ties keep the lower index first. No gradient."""
    x = mx.stop_gradient(x)
    key = -x if largest else x
    n = x.shape[-1]
    if k == n or n <= 256 or 4 * k >= n:
        return mx.argsort(key, axis=-1)[..., :k]
    # many entries, few kept: partition first, then order the k candidates (stable argsort)
    part = mx.argpartition(key, kth=k - 1, axis=-1)[..., :k]
    order = mx.argsort(mx.take_along_axis(key, part, axis=-1), axis=-1)
    return mx.take_along_axis(part, order, axis=-1)


def topk(x: mx.array, k: int, axis: int = -1, largest: bool = True):
    """``torch.topk`` for MLX: x [..., n, ...] -> (values, indices), both [..., k, ...] along ``axis``.

    values are sorted descending (ascending with ``largest=False``) and differentiable: the
    gradient of values[j] reaches x[indices[j]] only, like ``torch.topk``'s backward (a
    scatter of the incoming gradient into zeros). indices are uint32 and carry no gradient, so
    no ``stop_gradient`` is needed in user code.
    """
    if not isinstance(x, mx.array):
        raise TypeError(f"x must be an mlx.core.array, got {type(x).__name__}")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension, got a scalar")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis!r} is out of range for an array of {x.ndim} dimensions")
    check_int("k", k, 1, x.shape[axis])
    moved = mx.moveaxis(x, axis, -1) if axis not in (-1, x.ndim - 1) else x
    idx = topk_indices(moved, k, largest)
    values = mx.take_along_axis(moved, idx, axis=-1)
    if moved is not x:
        values, idx = mx.moveaxis(values, -1, axis), mx.moveaxis(idx, -1, axis)
    return values, idx


def one_hot(indices: mx.array, n: int, dtype=mx.float32) -> mx.array:
    """[..., K] integer indices -> [..., K, n] one-hot (no gradient)."""
    return (mx.stop_gradient(indices)[..., None] == mx.arange(n)).astype(dtype)


def selected_mask(indices: mx.array, n: int) -> mx.array:
    """[T, K] indices -> [T, n] float32, 1 where the entry was selected."""
    return one_hot(indices, n).sum(-2)


def counts(indices: mx.array, n: int) -> mx.array:
    """Histogram of integer indices (any shape) over 0..n-1 -> [n] int64."""
    flat = mx.stop_gradient(indices).reshape(-1)
    return mx.zeros((n,), dtype=mx.int64).at[flat].add(mx.ones(flat.shape, dtype=mx.int64))


def ndtr(x: mx.array) -> mx.array:
    """Standard normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2."""
    return 0.5 * (1.0 + mx.erf(x * (1.0 / math.sqrt(2.0))))


class Noise:
    """Random draws from MLX's global generator, or from a private key when ``seed`` is given
    (split on every draw, so consecutive calls differ and a run is reproducible)."""

    def __init__(self, seed: Optional[int] = None) -> None:
        if seed is not None:
            check_int("seed", seed, 0)
        self._key = None if seed is None else mx.random.key(seed)

    def _next(self):
        if self._key is None:
            return None
        self._key, sub = mx.random.split(self._key)
        return sub

    def uniform(self, shape) -> mx.array:
        """U(0, 1) float32 clamped into [tiny, 1 - eps] (so both logs below stay finite)."""
        u = mx.random.uniform(shape=shape, dtype=mx.float32, key=self._next())
        return mx.clip(u, TINY, 1.0 - EPS)

    def gumbel(self, shape) -> mx.array:
        """Standard Gumbel G = -log(-log U)."""
        return -mx.log(-mx.log(self.uniform(shape)))

    def normal(self, shape) -> mx.array:
        return mx.random.normal(shape=shape, dtype=mx.float32, key=self._next())
