"""Auxiliary-loss-free balancing in MLX (DeepSeek-V3; the twin of :mod:`moegrad.balancing`).

Shapes: E experts. Each :class:`~moegrad.mlx.Router` built with ``selection_bias=True`` holds a
bias b [E] fp32 that is added to the scores for the selection only, and ``load_counts`` [E], the
(token, slot) pairs routed to each expert in training mode since the last reset. Between
optimizer steps :class:`BiasBalancer` moves the bias toward balance:

    b_i += gamma * sign(mean_j load_j - load_i)

:class:`QuantileBalancer` sets the bias instead (Kimi K3 quantile balancing, see
:class:`moegrad.QuantileBalancer` for the maths): b_j = the ceil(K N / E)-th smallest
alpha_t - s_tj over the step's real tokens, centred, from histograms [E, bins] filled by the
router's ``observer`` in training mode.

The balance losses (pure functions of one call's Routing) are :mod:`moegrad.mlx.losses`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from moegrad._spec import (QUANTILE_BINS, balanced_routers, quantile_balanced_routers, quantile_rank,
                           quantile_step_range)
from moegrad.mlx.ops import counts
from moegrad.mlx.routing import Router, Routing


class BiasBalancer:
    """Auxiliary-loss-free balancing (DeepSeek-V3): b_i += gamma * sign(mean_load - load_i).

    ``module``: a Router, an MoE or a whole model; every :class:`~moegrad.mlx.Router` in it built
    with ``selection_bias=True`` is balanced from its ``load_counts``. Call :meth:`step` after
    the optimizer update. The bias and its updates are fp32 whatever the model's dtype: the
    Router keeps ``bias`` fp32 through ``model.set_dtype(mx.bfloat16)`` (in bf16, +1e-3 on 0.5
    would round away while -1e-3 applies).
    """

    def __init__(self, module: nn.Module, gamma: float = 1e-3) -> None:
        self.gamma, self.routers = balanced_routers(module, gamma, nn.Module, lambda m: isinstance(m, Router),
                                                    "mlx.nn.Module", "moegrad.mlx")

    def step(self) -> list:
        """Update every bias from its counts, reset the counts; returns the loads used."""
        loads = []
        for router in self.routers:
            load = router.reset_load_counts().astype(mx.float32)
            if float(load.sum()) > 0:
                router.bias = router.bias + self.gamma * mx.sign(load.mean() - load)
            loads.append(load)
        return loads


class QuantileBalancer:
    """Quantile balancing (Kimi K3 sec. 2.3.3), the MLX twin of :class:`moegrad.QuantileBalancer`.

    Every :class:`~moegrad.mlx.Router` in ``module`` built with ``selection_bias=True`` gets an
    ``observer`` (MLX has no forward hooks) that adds, in training mode, the real tokens'
    d_tj = alpha_t - s_tj (alpha_t the (K+1)-th largest of s_t + b) to an int64 histogram
    [E, bins] over [b_min - 1, b_max + 1). :meth:`step` (after the optimizer update) sets
    b = the centred ceil(K N / E)-th smallest d per expert, within half a bin width (one after centring) of the
    sorted value, resets the histograms and ``load_counts`` and returns the step's loads.
    No expert parallelism on MLX. :meth:`remove` detaches the observers.
    """

    def __init__(self, module: nn.Module, bins: int = QUANTILE_BINS) -> None:
        self.bins, self.routers = quantile_balanced_routers(module, bins, nn.Module,
                                                            lambda m: isinstance(m, Router),
                                                            "mlx.nn.Module", "moegrad.mlx")
        taken = [r for r in self.routers if r.observer is not None]
        if taken:
            raise ValueError(f"{len(taken)} of the {len(self.routers)} routers already have an "
                             "observer (a QuantileBalancer); reuse it or call its remove() first")
        self.histograms = [mx.zeros((r.num_experts, self.bins), dtype=mx.int64) for r in self.routers]
        self._ranges = [None] * len(self.routers)
        for i, router in enumerate(self.routers):
            router.observer = self._observer(i)

    def _observer(self, i: int):
        def observe(router: Router, routing: Routing) -> None:
            self._accumulate(i, router, routing)
        return observe

    def range(self, i: int) -> tuple:
        """(lo, bin width) of router i's histogram this step (as in PyTorch: a bias that left
        the step's first extremes is a ValueError, :func:`moegrad._spec.check_quantile_bias`)."""
        bias = self.routers[i].bias
        extremes = tuple(mx.stack([bias.min(), bias.max()]).tolist())  # one evaluation per call
        self._ranges[i] = quantile_step_range(self._ranges[i], extremes, self.bins, i)
        return self._ranges[i][:2]

    def _accumulate(self, i: int, router: Router, routing: Routing) -> None:
        scores = mx.stop_gradient(routing.scores).astype(mx.float32)  # [T, E]
        t, e = scores.shape
        if not t:
            return
        k = router.top_k
        alpha = mx.sort(scores + router.bias, axis=-1)[:, e - k - 1]  # (K+1)-th largest [T]
        lo, width = self.range(i)
        which = mx.clip(mx.floor((alpha[:, None] - scores - lo) / width), 0, self.bins - 1)
        which = which.astype(mx.int32) + mx.arange(e, dtype=mx.int32) * self.bins
        if routing.mask is not None:  # padding goes to an extra bin that is dropped
            which = mx.where(routing.mask[:, None], which, e * self.bins)
        added = counts(which, e * self.bins + 1)[:-1].reshape(e, self.bins)
        self.histograms[i] = self.histograms[i] + added

    def biases(self) -> list:
        """The centred biases [E] fp32 the histograms so far give (None: no real token)."""
        out = []
        for i, router in enumerate(self.routers):
            hist = self.histograms[i]
            n = int(hist[0].sum())
            if n == 0:
                out.append(None)
                continue
            rank = quantile_rank(router.top_k, router.num_experts, n)
            index = (mx.cumsum(hist, axis=1) < rank).sum(axis=1)  # first bin with cum >= rank
            lo, width = self.range(i)
            b = lo + (index.astype(mx.float32) + 0.5) * width
            out.append(b - b.mean())
        return out

    def step(self) -> list:
        """Set every bias, reset the histograms and ``load_counts``; returns the loads [E]."""
        loads = []
        for router, bias in zip(self.routers, self.biases()):
            if bias is not None:
                router.bias = bias.astype(mx.float32)
            loads.append(router.reset_load_counts().astype(mx.float32))
        self.reset()
        return loads

    def reset(self) -> None:
        """Forget what the histograms counted since the last :meth:`step` (the biases stay)."""
        for i, hist in enumerate(self.histograms):
            self.histograms[i] = mx.zeros_like(hist)
            self._ranges[i] = None

    def remove(self) -> None:
        """Detach the observers: the routers keep their bias and are no longer counted."""
        for router in self.routers:
            router.observer = None
        self.routers, self.histograms, self._ranges = [], [], []
