"""Balancing state kept across layer calls: :class:`BalanceWindow` and :class:`BiasBalancer`.

The balance losses themselves are pure functions of one layer call's
:class:`~moegrad.routing.Routing` (:mod:`moegrad.losses`). The two objects here walk a model
for its :class:`moegrad.MoE` layers / :class:`moegrad.Router` s and keep what spans calls:

* :class:`BalanceWindow`: the ``switch`` loss's expert counts over the micro-batches of a
  gradient-accumulation step (each layer's ``balance_window`` buffer [E + 1], read by
  :meth:`moegrad.MoE.forward` and passed to :func:`moegrad.losses.balance_losses`);
* :class:`BiasBalancer`: DeepSeek-V3's auxiliary-loss-free selection bias,
  b_i += gamma * sign(mean_load - load_i), from the routers' ``load_counts`` [E].

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
from moegrad._spec import balanced_routers
from moegrad.routing import is_router

__all__ = ["BalanceWindow", "BiasBalancer"]


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
