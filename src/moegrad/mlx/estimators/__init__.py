"""The MLX estimator catalogue, by name (the same names and semantics as
:mod:`moegrad.estimators`): topk, unweighted, straight_through, dense, default_moe, gumbel,
noisy_topk, sparsemixer."""

from __future__ import annotations

from moegrad._spec import estimator_names, estimator_spec
from moegrad.mlx.estimators.base import Estimator, Picked
from moegrad.mlx.estimators.dense import DefaultMoE, Dense, dense_router_grad, dense_score_grad
from moegrad.mlx.estimators.gumbel import Gumbel
from moegrad.mlx.estimators.noisy import NoisyTopK, smooth_load
from moegrad.mlx.estimators.sparsemixer import SparseMixer
from moegrad.mlx.estimators.weighted import StraightThrough, TopK, Unweighted

REGISTRY: dict[str, type[Estimator]] = {
    cls.name: cls
    for cls in (TopK, Unweighted, StraightThrough, Dense, DefaultMoE, Gumbel, NoisyTopK, SparseMixer)
}


def available() -> list[str]:
    """Sorted names of every estimator (:func:`moegrad._spec.estimator_names`)."""
    return estimator_names()


def get(name: str) -> type[Estimator]:
    """The estimator class registered under ``name`` (ValueError listing the names otherwise)."""
    return REGISTRY[estimator_spec(name).name]


def build_estimator(name: str, config, **options) -> Estimator:
    return get(name)(config, **options)


__all__ = ["Estimator", "Picked", "available", "get", "build_estimator", "REGISTRY", "TopK",
           "Unweighted", "StraightThrough", "Dense", "DefaultMoE", "Gumbel", "NoisyTopK",
           "SparseMixer", "dense_router_grad", "dense_score_grad", "smooth_load"]
