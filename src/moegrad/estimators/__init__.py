"""The catalogue of top-k gradient estimators, by name.

======================  =================================================================
``topk``                plain autograd through the gathered weights (torch.topk, Mixtral)
``unweighted``          unit weights, no router task gradient (control)
``straight_through``    unit weights forward, gradient as if y = sum_S s_i e_i
``dense``               exact dense straight-through (DenseMixer)
``default_moe``         dense gradient from EMA default outputs (Panda et al. 2025)
``gumbel``              Gumbel-top-k with a relaxed softmax (soft or hard)
``noisy_topk``          Shazeer et al. 2017 noisy top-k gating with a smooth load
``sparsemixer``         SparseMixer-v2 (GRIN 2024)
======================  =================================================================

``REGISTRY`` {name: class}, ``available``, ``get`` and ``build_estimator`` come from
:func:`moegrad._spec.make_registry` (the MLX catalogue :mod:`moegrad.mlx.estimators` is built
the same way).
"""

from __future__ import annotations

from moegrad._namespace import public_dir

from moegrad._spec import make_registry
from moegrad.estimators.base import Estimator, Picked
from moegrad.estimators.dense import Dense, DefaultMoE
from moegrad.estimators.gumbel import Gumbel
from moegrad.estimators.noisy import NoisyTopK
from moegrad.estimators.sparsemixer import SparseMixer
from moegrad.estimators.weighted import StraightThrough, TopK, Unweighted

REGISTRY, available, get, build_estimator = make_registry(
    (TopK, Unweighted, StraightThrough, Dense, DefaultMoE, Gumbel, NoisyTopK, SparseMixer))


__all__ = ["Estimator", "Picked", "available", "get", "build_estimator", "REGISTRY", "TopK",
           "Unweighted", "StraightThrough", "Dense", "DefaultMoE", "Gumbel", "NoisyTopK",
           "SparseMixer"]


__dir__ = public_dir(__name__, __all__)
