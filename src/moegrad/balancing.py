"""Balancing state kept across layer calls: :class:`BalanceWindow`, :class:`BiasBalancer` and
:class:`QuantileBalancer`.

The balance losses themselves are pure functions of one layer call's
:class:`~moegrad.routing.Routing` (:mod:`moegrad.losses`). The two objects here walk a model
for its :class:`moegrad.MoE` layers / :class:`moegrad.Router` s and keep what spans calls:

* :class:`BalanceWindow`: the ``switch`` loss's expert counts over the micro-batches of a
  gradient-accumulation step (each layer's ``balance_window`` buffer [E + 1], read by
  :meth:`moegrad.MoE.forward` and passed to :func:`moegrad.losses.balance_losses`);
* :class:`BiasBalancer`: DeepSeek-V3's auxiliary-loss-free selection bias,
  b_i += gamma * sign(mean_load - load_i), from the routers' ``load_counts`` [E];
* :class:`QuantileBalancer`: Kimi K3's quantile balancing, b_j = K/E quantile of
  (alpha_t - s_tj) over the global batch, from per-expert histograms [E, bins] filled by a
  forward hook on each router.

Shapes: E experts. Under expert parallelism the counts are summed over the ranks
(:mod:`moegrad._collectives`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from moegrad._collectives import all_reduce_detached
from moegrad.layer import MoE
from moegrad.losses import SWITCH_LOSSES
from moegrad._spec import (QUANTILE_BINS, balanced_routers, quantile_balanced_routers, quantile_rank,
                           quantile_step_range)
from moegrad.routing import Routing, is_router, recomputing_in_backward

__all__ = ["BalanceWindow", "BiasBalancer", "QuantileBalancer"]


class BalanceWindow:
    """Global-batch ``switch`` loss under gradient accumulation (Qiu et al. 2025, "Demons in the
    Detail", arXiv 2501.11873: balance over the global batch, not each micro-batch).

    ``BalanceWindow(module)`` gives every :class:`moegrad.MoE` inside ``module`` whose losses
    include ``switch`` (or ``switch_megatron``, the same f) an int64 buffer ``balance_window``
    [E + 1] (non-persistent: not in the state dict; the MoE declares it empty, None, until a
    window fills it): the (token, slot) counts per expert and the number of real tokens of every
    micro-batch since the last :meth:`reset`, summed over the ranks under expert parallelism. In training
    mode, micro-batch m = 1..M of the window computes

        f_i = C_i(1..m) / N(1..m)    counts of micro-batches 1..m, this one included (no gradient)
        P_i = P_i(m)                 this micro-batch's mean normalised score (as without a window)
        switch = E * sum_i f_i P_i   (with expert parallelism each rank returns its share, as usual)

    so at the last micro-batch f is exactly the whole window's f (every micro-batch of every
    rank). Earlier micro-batches use the counts seen so far: future counts are not known yet. Eval
    mode neither reads nor adds to the window; the other losses are unchanged (``z_loss`` has no
    counts, ``seq_aux`` is per sequence by definition, ``importance_load`` is differentiable in
    its load). A forward recomputed by activation checkpointing is counted once.

    Scaling: divide each micro-batch's ``aux_loss`` by the number M of micro-batches, like a
    mean-reduced task loss: ``((task_loss + out.aux_loss) / M).backward()``. The accumulated
    gradient is then that of (1/M) sum_m E sum_i f_i(1..m) P_i(m); with equal micro-batches and
    every f replaced by the window's, this is exactly E sum_i f_i P_i over the global batch. No
    factor W: with expert parallelism the mean over ranks of ``aux_loss`` is the global value and
    DDP averages the router gradients. Call :meth:`reset` after ``optimizer.step()``::

        window = BalanceWindow(model)
        for batch in loader:
            for x in batch.chunk(M):
                out = model(x)        # model: a moegrad.MoE (sum every layer's aux_loss in a network)
                ((task_loss(out.y) + out.aux_loss) / M).backward()
            optimizer.step(); optimizer.zero_grad()
            window.reset()
    """

    BUFFER = "balance_window"

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"BalanceWindow expects an nn.Module holding moegrad.MoE layers, got "
                            f"{type(module).__name__}")
        self.layers = [m for m in module.modules()
                       if isinstance(m, MoE) and any(name in m.losses for name in SWITCH_LOSSES)]
        if not self.layers:
            raise ValueError(f"{type(module).__name__} holds no moegrad.MoE with the switch loss; the "
                             "window accumulates its counts: build the layers with losses={'switch': c} "
                             "(or 'switch_megatron')")
        taken = [m for m in self.layers if m.balance_window is not None]
        if taken:
            raise ValueError(f"{len(taken)} of the {len(self.layers)} MoE layers already belong to a "
                             "BalanceWindow; reuse it (one window per model)")
        for m in self.layers:
            m.register_buffer(self.BUFFER, torch.zeros(m.num_experts + 1, dtype=torch.int64,
                                                       device=m.router.gate.weight.device),
                              persistent=False)

    def fractions(self) -> list[Tensor]:
        """f [E] fp64 of each layer over the window so far (zeros before any real token)."""
        out = []
        for m in self.layers:
            w = m.balance_window.double()
            out.append(w[:-1] / w[-1] if w[-1] > 0 else torch.zeros_like(w[:-1]))
        return out

    @torch.no_grad()
    def reset(self) -> list[Tensor]:
        """Start a new window (call after ``optimizer.step()``); returns the finished window's f."""
        out = self.fractions()
        for m in self.layers:
            m.balance_window.zero_()
        return out

    def remove(self) -> None:
        """Detach the window: the layers go back to per-micro-batch counts."""
        for m in self.layers:
            m.balance_window = None  # MoE declares the (empty) buffer
        self.layers = []


class BiasBalancer:
    """Auxiliary-loss-free balancing (DeepSeek-V3): b_i += gamma * sign(mean_load - load_i).

    ``module`` is a Router, an MoE or a whole model: every Router inside it that was built with
    ``selection_bias=True`` is balanced (with :mod:`moegrad.hf`, DeepSeek-V3's
    ``e_score_correction_bias``). Loads are the routers' ``load_counts`` buffers, gathered in
    training mode since the last :meth:`step`; call :meth:`step` after ``optimizer.step()``.
    The bias changes which experts are selected, never the combine weights.

    Precision: the updates are computed in fp32. A :class:`moegrad.Router` keeps its ``bias`` in
    fp32 whatever the model's dtype (``model.to(torch.bfloat16)`` leaves it fp32, as
    Megatron-Core keeps its ``expert_bias``). A bias held in a lower precision by someone else
    (an HF DeepSeek-V3 model cast with ``.to(torch.bfloat16)`` casts its
    ``e_score_correction_bias``) is updated through an fp32 master copy kept here: b_fp32 +=
    update, then the buffer gets b_fp32 rounded to its dtype. In bf16, +1e-3 on 0.5 would round
    away while -1e-3 applies, so a direct update would drift one way; through the master copy
    the buffer stays the nearest bf16 value of the exact fp32 sum. The master copy starts from
    the buffer and starts again from it whenever the buffer no longer equals the rounded copy
    (it was loaded or set elsewhere); it is not saved with the model.
    """

    def __init__(self, module: nn.Module, gamma: float = 1e-3) -> None:
        self.gamma, self.routers = balanced_routers(module, gamma, nn.Module, is_router, "nn.Module",
                                                    "moegrad")
        self._masters: list[Optional[Tensor]] = [None] * len(self.routers)  # fp32 copies of low-precision biases

    @torch.no_grad()
    def step(self) -> list[Tensor]:
        """Update every bias from its counts, reset the counts; returns the loads used."""
        loads = []
        for i, router in enumerate(self.routers):
            load = router.reset_load_counts().float()
            group = router.process_group  # set by moegrad.distributed.expert_parallel
            if group is not None:  # every rank applies the same update from the global loads
                load = all_reduce_detached(load, group)
            if load.sum() > 0:
                self._update(i, router.bias, self.gamma * torch.sign(load.mean() - load))
            loads.append(load)
        return loads

    def _update(self, i: int, bias: Tensor, update: Tensor) -> None:
        """bias += update [E] fp32, through an fp32 master copy when ``bias`` is bf16/fp16."""
        if bias.dtype in (torch.float32, torch.float64):
            bias += update.to(bias.dtype)
            self._masters[i] = None
            return
        master = self._masters[i]
        if master is None or master.device != bias.device or not torch.equal(master.to(bias.dtype), bias):
            master = bias.float()  # first step, or the buffer changed elsewhere: start from it
        master += update
        bias.copy_(master)  # round to nearest
        self._masters[i] = master


class QuantileBalancer:
    """Quantile balancing (Kimi K3 technical report, sec. 2.3.3): an auxiliary-loss-free
    selection bias set, not nudged, once per optimizer step.

    ``module`` is a Router, an MoE or a whole model: every router in it built with
    ``selection_bias=True`` is balanced (with :mod:`moegrad.hf`, DeepSeek-V3's
    ``e_score_correction_bias``), as :class:`BiasBalancer` finds them. For a router with E
    experts, top-k K < E, raw scores s_t [E] (softmax or sigmoid, in [0, 1]) and the bias b used
    by the forward:

        alpha_t = (K+1)-th largest of s_t + b          the admission threshold of token t
        d_tj    = alpha_t - s_tj                       [T, E]
        b'_j    = m-th smallest d_tj over the N real tokens of the step, m = ceil(K N / E)
        b_new   = b' - mean_j b'_j                     (centred)

    The tokens are all micro-batches of every training-mode forward since the last
    :meth:`step` and, under expert parallelism (``router.process_group``), of every rank.
    Why this balances: token t selects j when s_tj + b_j beats alpha_t, i.e. d_tj < b_j; with
    b_j the K/E quantile of d_.j, about K N / E tokens do, the balanced load (with the other
    experts' thresholds alpha held at this step's values: a coordinate-wise fixed point,
    re-estimated every step). Centring changes no selection. ``s`` is the raw score and alpha
    uses the current bias; the combine weights stay the unbiased scores' (the bias only
    selects).

    The quantile comes from a histogram: ``bins`` equal bins per expert over
    [b_min - 1, b_max + 1) (b the bias at the step's first forward; d always lies in that range,
    :func:`moegrad._spec.quantile_range`), int64 counts [E, bins] per router, summed over the
    ranks in :meth:`step`. b'_j is the centre of the bin holding the m-th smallest value
    (:func:`moegrad._spec.histogram_quantile`), so it is within half a bin width (one bin after centring),
    (b_max - b_min + 2) / (2 bins), of the sorted value. Counting happens in a forward hook
    (``register_forward_hook`` on each router, reading the returned :class:`Routing`'s
    ``scores`` and ``mask``): training mode only, padding tokens excluded, a forward re-run by
    activation checkpointing counted once, eval mode not at all. Memory: E * bins * 8 bytes
    per router (E = 64, bins = 4096: 2 MiB).

    Usage: ``balancer = QuantileBalancer(model)``; after each ``optimizer.step()``, call
    ``balancer.step()`` (returns the loads [E] of the finished step, like
    :meth:`BiasBalancer.step`, and resets the routers' ``load_counts``). :meth:`remove`
    detaches the hooks. Do not also attach a :class:`BiasBalancer` to the same routers.

    Precision: the new bias is computed in fp32 and written into the router's bias (a
    :class:`moegrad.Router` keeps it fp32). A lower-precision bias (an HF DeepSeek-V3 model cast
    to bf16) gets the new value rounded to nearest: unlike BiasBalancer's small increments,
    a value that is set each step does not accumulate rounding, so no fp32 master copy is kept.

    Group-limited top-k (``n_group``): alpha is the (K+1)-th biased score over all experts,
    as in the K3 definition, not within the kept groups.

    Differences from other implementations (read, not copied): Megatron-Core's
    ``quantile_balancing`` routing (NVIDIA/Megatron-LM PR 5349) subtracts its bias
    (top-k of s - beta, so beta = -b), takes a per-micro-batch quantile by top-k over tokens,
    averages it over micro-batches and data-parallel ranks and optionally blends with an EMA;
    later versions use a histogram with a learned range (``qb_bin_bounds``, 1000 bins). Here
    the quantile is of the whole global batch (one histogram over micro-batches and ranks,
    not a mean of per-micro-batch quantiles), the range is exact from the bias, and there is
    no EMA.
    """

    def __init__(self, module: nn.Module, bins: int = QUANTILE_BINS) -> None:
        self.bins, self.routers = quantile_balanced_routers(module, bins, nn.Module, is_router,
                                                            "nn.Module", "moegrad")
        taken = [r for r in self.routers
                 if any(getattr(h, "quantile_balancer", False) for h in r._forward_hooks.values())]
        if taken:
            raise ValueError(f"{len(taken)} of the {len(self.routers)} routers already belong to a "
                             "QuantileBalancer; reuse it or call its remove() first")
        self.histograms: list[Tensor] = []
        self._ranges: list[Optional[tuple[float, float]]] = [None] * len(self.routers)
        self._handles = []
        for i, router in enumerate(self.routers):
            self.histograms.append(torch.zeros(router.config.num_experts, self.bins, dtype=torch.int64,
                                               device=router.gate.weight.device))
            self._handles.append(router.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(router, args, routing) -> None:
            if isinstance(routing, Routing) and router.training and not recomputing_in_backward():
                self._accumulate(i, router, routing)
        hook.quantile_balancer = True  # marks the router as taken
        return hook

    def range(self, i: int) -> tuple[float, float]:
        """(lo, bin width) of router i's histogram this step, set from the bias at the step's
        first forward; a later forward whose bias left that bias's extremes is a ValueError
        (:func:`moegrad._spec.check_quantile_bias`), never a silent clamp."""
        bias = self.routers[i].bias.detach().float()
        extremes = tuple(torch.stack(torch.aminmax(bias)).tolist())  # one host read per forward
        self._ranges[i] = quantile_step_range(self._ranges[i], extremes, self.bins, i)
        return self._ranges[i][:2]

    @torch.no_grad()
    def _accumulate(self, i: int, router: nn.Module, routing: Routing) -> None:
        """Add this call's d_tj = alpha_t - s_tj [T, E] of the real tokens to histogram i."""
        scores = routing.scores.detach()
        if routing.mask is not None:
            scores = scores[routing.mask]
        if not scores.shape[0]:
            return
        k, e = router.config.top_k, router.config.num_experts
        alpha = (scores + router.bias.to(scores.dtype)).topk(k + 1, dim=-1).values[:, k]  # [T]
        lo, width = self.range(i)
        d = alpha[:, None] - scores  # [T, E]
        which = ((d - lo) / width).floor().long().clamp_(0, self.bins - 1)
        which += torch.arange(e, device=which.device) * self.bins
        hist = self.histograms[i]
        hist.view(-1).add_(torch.bincount(which.reshape(-1), minlength=e * self.bins).to(hist.device))

    @torch.no_grad()
    def biases(self) -> list[Tensor]:
        """The centred biases b_new [E] fp32 the histograms so far give (summed over the ranks
        under expert parallelism: a collective, call it on every rank); None for a router that
        saw no real token."""
        out = []
        for i, router in enumerate(self.routers):
            hist = self.histograms[i]
            if router.process_group is not None:
                hist = all_reduce_detached(hist, router.process_group)
            n = int(hist[0].sum())
            if n == 0:
                out.append(None)
                continue
            rank = quantile_rank(router.config.top_k, router.config.num_experts, n)
            cum = hist.cumsum(1)  # [E, bins]
            target = torch.full((cum.shape[0], 1), rank, dtype=cum.dtype, device=cum.device)
            index = torch.searchsorted(cum, target).squeeze(1)  # first bin with cum >= rank
            lo, width = self.range(i)
            b = lo + (index.double() + 0.5) * width
            out.append((b - b.mean()).float())
        return out

    @torch.no_grad()
    def step(self) -> list[Tensor]:
        """Set every bias from its histograms, reset them and the routers' ``load_counts``;
        returns the loads [E] fp32 of the finished step (summed over the ranks)."""
        loads = []
        for router, bias in zip(self.routers, self.biases()):
            if bias is not None:
                router.bias.copy_(bias)  # rounds to nearest for a bf16 bias (see the docstring)
            load = router.reset_load_counts().float()
            if router.process_group is not None:
                load = all_reduce_detached(load, router.process_group)
            loads.append(load)
        self.reset()
        return loads

    def reset(self) -> None:
        """Forget what the histograms counted since the last :meth:`step` (the biases stay)."""
        for i, hist in enumerate(self.histograms):
            hist.zero_()
            self._ranges[i] = None

    def remove(self) -> None:
        """Detach the hooks: the routers keep their current bias and are no longer counted."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.routers, self.histograms, self._ranges = [], [], [], []
