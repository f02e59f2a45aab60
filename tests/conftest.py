"""Shared test helpers: independent reference computations written without moegrad's dispatch."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def one_torch_thread():
    """PyTorch on one intra-op thread meanwhile (the thread count is restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def expert_ref(x, moe, e):
    """Expert e of ``moe`` on x [t, D] written from the weights: w2 (silu(w1 x) * (w3 x))."""
    ex = moe.experts
    gate = x @ ex.w1[e].T
    h = F.silu(gate) * (x @ ex.w3[e].T) if ex.w3 is not None else F.gelu(gate)
    return h @ ex.w2[e].T


def every_expert_ref(x, moe):
    """[T, E, D]: all experts on all tokens, one by one."""
    return torch.stack([expert_ref(x, moe, e) for e in range(moe.num_experts)], dim=1)


def moe_loop_ref(x, moe, routing):
    """y[t] = sum_j w[t, j] E_{idx[t, j]}(x_t), token by token, from a given routing."""
    flat = x.reshape(-1, x.shape[-1])
    rows = []
    for t in range(flat.shape[0]):
        acc = torch.zeros_like(flat[t])
        for j in range(routing.indices.shape[1]):
            e = int(routing.indices[t, j])
            acc = acc + routing.weights[t, j].to(flat.dtype) * expert_ref(flat[t:t + 1], moe, e)[0]
        rows.append(acc)
    return torch.stack(rows).view(x.shape) if rows else torch.zeros_like(x)


def capacity_keep_ref(indices, weights, num_experts, capacity):
    """[T, K] bool: each expert keeps its ``capacity`` highest-weight (token, slot) pairs, ties
    to the earlier pair; written as a sort per expert, without moegrad's dispatch."""
    t, k = indices.shape
    w = weights.detach()
    keep = torch.zeros(t, k, dtype=torch.bool)
    for e in range(num_experts):
        pairs = [(float(w[i, j]), -(i * k + j), i, j) for i in range(t) for j in range(k)
                 if int(indices[i, j]) == e]
        for _, _, i, j in sorted(pairs, reverse=True)[:capacity]:
            keep[i, j] = True
    return keep
