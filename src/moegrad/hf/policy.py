"""The forward policy: which estimators keep what a loaded model computes.

:func:`moegrad.hf.patch` refuses (ValueError naming the estimator, the family and the reason)
an estimator whose eval-mode forward differs from the family's own routing, unless
``allow_forward_change=True``. Per block (s scores, S the top-k, c = routed_scaling_factor),
checked against the logits for every family in the tests:

    keep                    topk, dense, default_moe (any family but PhiMoE)
    keep if softmax         gumbel with tau=1, hard=False (eval weights softmax(z)_S = s_S)
    keep if renormalised    noisy_topk (eval weights softmax(z_S) = s_S / sum_S s): Mixtral,
                            GPT-OSS, norm_topk_prob=True; sigmoid scores only with K=1
    keep if K=1 and         straight_through, gumbel (any tau, hard), unweighted (if c=1):
      renormalised          the family's weight is then the constant c
    change                  otherwise: unit weights (unweighted, straight_through, gumbel
                            hard=True), gumbel tau!=1, noisy_topk without renormalisation,
                            sparsemixer (masked-softmax weights; equal only for tokens whose
                            mask leaves one candidate), default_moe forward_defaults=True
                            (adds sum_{i not in S} s_i ebar_i)
    PhiMoE                  keep only sparsemixer with jitter_eps = router_jitter_noise

Sampling estimators are judged on their eval-mode forward (noise off); they cannot honour
DeepSeek-V3's group-limited, biased top-k and are refused there (:func:`_check_sampling`).
"""

from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from moegrad.estimators import available as available_estimators
from moegrad.estimators import build_estimator, get as get_estimator
from moegrad.hf.families import Family
from moegrad.routing import RouterConfig

__all__: list[str] = []  # internal: used by moegrad.hf.patch


def _check_sampling(family: Family, estimator: str, model_name: str) -> None:
    """A sampling estimator cannot honour DeepSeek-V3's group-limited, biased top-k."""
    if family.correction_bias and get_estimator(estimator).samples:
        allowed = [n for n in available_estimators() if not get_estimator(n).samples]
        raise ValueError(
            f"estimator={estimator!r} samples its expert selection, which cannot honour "
            f"{family.name}'s group-limited top-k and e_score_correction_bias in {model_name}; "
            f"use a deterministic estimator: {allowed}")


def _forward_change(family: Family, config: RouterConfig, estimator,
                    default: dict) -> Optional[str]:
    """Why the built ``estimator`` gives another eval-mode forward than ``family``'s own routing
    under ``config`` (None: the same). ``default``: the family's default options (PhiMoE's
    jitter_eps). The rule is the table of this module's docstring."""
    name = estimator.name
    if family.estimators is not None:  # PhiMoE: SparseMixer at the config's jitter
        if name not in family.estimators:
            return (f"{family.name} routes with SparseMixer (a masked softmax per pick, two "
                    f"picks), which only {list(family.estimators)} reproduces")
        for key, value in default.items():  # jitter_eps from the config's router_jitter_noise
            if getattr(estimator, key) != value:
                return (f"{key}={getattr(estimator, key)!r} differs from the config's "
                        f"router_jitter_noise={value!r}, which sets the SparseMixer mask")
        return None
    # K=1 with renormalised weights: every family weight is the constant c, only S matters
    top1 = config.normalize and config.top_k == 1
    unit = "it mixes the selected experts with unit weights, not the gate's scores"
    if name in ("topk", "dense"):
        return None
    if name == "default_moe":
        return ("forward_defaults=True adds sum_{i not in S} s_i * ebar_i to the output"
                if estimator.forward_defaults else None)
    if name == "unweighted":
        return None if top1 and config.routed_scaling_factor == 1.0 else unit
    if name == "straight_through":
        return None if top1 else unit
    if name == "gumbel":
        if top1:
            return None
        if estimator.hard:
            return "hard=True: " + unit
        if config.score != "softmax":
            return f"its weights are softmax(z / tau), not the family's {config.score} scores"
        if estimator.tau != 1.0:
            return f"its weights are softmax(z / tau) with tau={estimator.tau}, not softmax(z)"
        return None
    if name == "noisy_topk":
        if config.normalize and (config.score == "softmax" or config.top_k == 1):
            return None
        how = "renormalised" if config.normalize else "not renormalised"
        return (f"its weights are a softmax over the K kept logits, while {family.name} uses "
                f"{config.score} scores, {how} over the top-k")
    if name == "sparsemixer":
        return ("its weight for each pick is a softmax over the experts left by its mask, not "
                "the family's score")
    return "moegrad.hf does not know whether it keeps the family's forward"


def _keeping(family: Family, block: nn.Module, config: RouterConfig) -> list[str]:
    """The estimator names that keep ``family``'s forward with their default options."""
    keep = []
    for name in available_estimators():
        if (family.correction_bias or config.routing != "topk") and get_estimator(name).samples:
            continue  # refused with this routing (a ValueError when built)
        default = family.default_options(block, name)
        with warnings.catch_warnings():  # probes for the error message, not the user's choice
            warnings.simplefilter("ignore", UserWarning)
            built = build_estimator(name, config, **default)
        if _forward_change(family, config, built, default) is None:
            keep.append(name)
    return keep
