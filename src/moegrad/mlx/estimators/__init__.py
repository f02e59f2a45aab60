"""The MLX estimator catalogue, by name (the same names and semantics as
:mod:`moegrad.estimators`): topk, unweighted, straight_through, dense, default_moe, gumbel,
noisy_topk, sparsemixer. ``REGISTRY``, ``available``, ``get`` and ``build_estimator`` come from
:func:`moegrad._spec.make_registry`, as on the PyTorch side."""

from __future__ import annotations

from moegrad._spec import make_registry
from moegrad.mlx.estimators.base import Estimator, Picked
from moegrad.mlx.estimators.dense import DefaultMoE, Dense, dense_router_grad, dense_score_grad
from moegrad.mlx.estimators.gumbel import Gumbel
from moegrad.mlx.estimators.noisy import NoisyTopK, smooth_load
from moegrad.mlx.estimators.sparsemixer import SparseMixer
from moegrad.mlx.estimators.weighted import StraightThrough, TopK, Unweighted

REGISTRY, available, get, build_estimator = make_registry(
    (TopK, Unweighted, StraightThrough, Dense, DefaultMoE, Gumbel, NoisyTopK, SparseMixer))


__all__ = ["Estimator", "Picked", "available", "get", "build_estimator", "REGISTRY", "TopK",
           "Unweighted", "StraightThrough", "Dense", "DefaultMoE", "Gumbel", "NoisyTopK",
           "SparseMixer", "dense_router_grad", "dense_score_grad", "smooth_load"]
