"""The ``metrics.json`` document of a study cell: per-run values, per-estimator statistics,
paired tests, and how a grid's documents are read back against the baseline.

Every value is computed from the runs (:func:`moegrad.study.train.train_run`); statistics are
sample sd, t-based 95% intervals and paired t-tests across seeds with Holm's correction
(:mod:`moegrad.study.stats`).
"""

from __future__ import annotations

from typing import Optional

from moegrad import estimators as registry
from moegrad.study.options import NO_ESTIMATOR
from moegrad.study.stats import ALPHA, MIN_PAIRED, clean, compare_pairs, describe

#: metrics.json fields of every estimator, each {"mean", "sd", "std" (= sd), "ci95", "n",
#: "values"}; sd is the sample sd over seeds, ci95 the t-based 95% interval of the mean.
#: active_experts is the mean number of experts per token over the last evaluation window
#: (K under token choice; sum_e chosen[t, e] under expert_choice and remoe, whose purity reads
#: each token's highest-score chosen expert and counts a token no expert took as impure).
#: cos_exact is the cosine of the mean of diag_samples sampled gradients to the exact one,
#: cos_exact_sample the mean per-sample cosine (equal for deterministic estimators), both
#: averaged over the diagnostics after step 0 (step 0 apart: cos_exact_initial). Each
#: estimator also has "reference" (the exact reference's forward weight rule), "sampling"
#: (bool), "seeds", "time_limited_seeds" and "zero_gradient" (own-trajectory diagnostics where
#: the router gradient was exactly zero); with FLOP counts also "flops_per_step" and
#: "loss_at_equal_flops".
FIELDS = ("final_loss", "purity", "dead_experts", "load_cv", "max_violation", "entropy",
          "active_experts",
          "cos_exact", "cos_exact_sample", "cos_dense", "rel_err_exact", "grad_variance",
          "ms_per_step", "steps", "loss_at_equal_time", "steps_to_target")

#: metrics compared by paired tests across seeds: doc key -> the words used in sentences
TESTED = {"final_loss": "final validation loss", "purity": "routing purity",
          "loss_at_equal_flops": "validation loss at equal FLOPs"}
BASELINE = "topk"


# ---------------------------------------------------------------------------- per run

def _last(xs: list):
    vals = [x for x in xs if x is not None]
    return vals[-1] if vals else None


def _after_step0(h: dict, key: str):
    """Mean of a diagnostic over the diagnostic steps after step 0 (None if none)."""
    vals = clean(v for s, v in zip(h.get("diag_step", []), h.get(key, [])) if s > 0)
    return sum(vals) / len(vals) if vals else None


def _at_step0(h: dict, key: str):
    for s, v in zip(h.get("diag_step", []), h.get(key, [])):
        if s == 0:
            return v
    return None


def _zero_gradient_steps(h: dict) -> list[int]:
    """Diagnostic steps where the router gradient was exactly zero: cosine 0 with the exact
    gradient and relative error exactly 1 (||0 - g|| / ||g||); a non-zero gradient orthogonal
    to g has relative error > 1."""
    out = []
    rel = h.get("rel_err_exact") or [None] * len(h.get("cos_exact", []))
    for s, c, r in zip(h.get("diag_step", []), h.get("cos_exact", []), rel):
        if c == 0.0 and (r is None or abs(r - 1.0) < 1e-12):
            out.append(s)
    return out


def time_limited(run: dict) -> bool:
    """The run was stopped by the time budget before its step budget."""
    return bool(run.get("time_limited", run.get("stopped_by") == "time"))


def loss_at_time(run: dict, t: float) -> Optional[float]:
    """Validation loss of the last evaluation at training time <= t."""
    h = run["history"]
    best = None
    for when, loss in zip(h["eval_time"], h["val_loss"]):
        if when <= t + 1e-9:
            best = loss
    return best


def loss_at_flops(run: dict, budget: float) -> Optional[float]:
    """Validation loss of the last evaluation whose cumulative training FLOPs are <= budget;
    None without FLOP counts or when the run stopped before reaching the budget."""
    h = run["history"]
    flops = h.get("flops")
    if not flops or budget is None or flops[-1] < budget * (1 - 1e-9):
        return None
    best = None
    for f, loss in zip(flops, h["val_loss"]):
        if f <= budget * (1 + 1e-9):
            best = loss
    return best


def steps_to(run: dict, target: float) -> Optional[int]:
    """First evaluated step whose validation loss is <= target (None if never)."""
    h = run["history"]
    for step, loss in zip(h["eval_step"], h["val_loss"]):
        if loss <= target:
            return step
    return None


def flops_budget(runs: list[dict], args: dict) -> Optional[float]:
    """The FLOP budget of the equal-FLOPs comparison: ``args["flops_budget"]`` if given, else
    the smallest total training FLOPs of a run not stopped by the clock (every such run reaches
    it); None when the runs carry no FLOP counts."""
    if not runs or not all(r["history"].get("flops") for r in runs):
        return None
    if args.get("flops_budget"):
        return float(args["flops_budget"])
    full = [r for r in runs if not time_limited(r)] or runs
    return float(min(r["history"]["flops"][-1] for r in full))


def run_values(run: dict, equal_time: float, target: float, budget: Optional[float]) -> dict:
    """One run -> {field: value} (None where the run has no such value)."""
    h = run["history"]
    return {
        "final_loss": h["val_loss"][-1],
        "purity": _last(h["purity"]),
        "bits_per_char": _last(h["bits_per_char"]),
        "dead_experts": h["dead"][-1],
        "load_cv": h["load_cv"][-1],
        "max_violation": h["max_violation"][-1],
        "entropy": _last(h["entropy"]),
        "active_experts": _last(h.get("active") or [None]),
        "cos_exact": _after_step0(h, "cos_exact"),
        "cos_exact_sample": _after_step0(h, "cos_exact_sample"),
        "cos_dense": _after_step0(h, "cos_dense"),
        "cos_exact_initial": _at_step0(h, "cos_exact"),
        "cos_exact_sample_initial": _at_step0(h, "cos_exact_sample"),
        "rel_err_exact": _after_step0(h, "rel_err_exact"),
        "grad_variance": _after_step0(h, "variance"),
        "ms_per_step": run["ms_per_step"],
        "steps": run["steps"],
        "loss_at_equal_time": loss_at_time(run, equal_time),
        "steps_to_target": steps_to(run, target),
        "flops_per_step": run.get("flops_per_step"),
        "loss_at_equal_flops": loss_at_flops(run, budget) if budget is not None else None,
    }


# -------------------------------------------------------------------------- aggregate

def _layer_mean(drift: list, key: str) -> float:
    return sum(layer[key] for layer in drift) / len(drift)


def finetune_stats(runs: list[dict]) -> dict:
    """Per-estimator statistics of ``--regime finetune`` runs (each with ``before`` and
    ``drift``, the per-layer :func:`moegrad.diagnostics.compare_routing` between the start and
    the end of fine-tuning): held-out loss on the shifted distribution before fine-tuning, and
    the drift averaged over layers (top-k overlap, Jensen-Shannon divergence) or summed over
    layers (experts revived, killed)."""
    return {
        "loss_before": describe([r["before"]["val_loss"] for r in runs]),
        "drift_topk_overlap": describe([_layer_mean(r["drift"], "topk_overlap") for r in runs]),
        "drift_js": describe([_layer_mean(r["drift"], "js_divergence") for r in runs]),
        "experts_revived": describe([sum(len(layer["revived"]) for layer in r["drift"])
                                     for r in runs]),
        "experts_killed": describe([sum(len(layer["killed"]) for layer in r["drift"])
                                    for r in runs]),
    }


def aggregate(runs: list[dict], task, args: dict) -> dict:
    """runs (from :func:`moegrad.study.train.train_run`) -> the metrics.json document of one
    cell: per-estimator statistics (sample sd, 95% CI, n) and ``comparisons``, the paired
    t-tests between estimators across seeds, Holm-corrected within each metric."""
    names = list(dict.fromkeys(r["estimator"] for r in runs))
    equal_time = min(r["train_time"] for r in runs)
    finals = [r["history"]["val_loss"][-1] for r in runs]
    # target: the loss that the median estimator reaches at the end (per-seed median over runs)
    target = sorted(finals)[len(finals) // 2]
    budget = flops_budget(runs, args)
    values = {}  # estimator -> seed -> field -> value
    for r in runs:
        values.setdefault(r["estimator"], {})[r["seed"]] = run_values(r, equal_time, target, budget)
    per = {}
    for name in names:
        mine = [r for r in runs if r["estimator"] == name]
        rows = [values[name][r["seed"]] for r in mine]
        keys = [k for k in rows[0] if k not in ("flops_per_step", "loss_at_equal_flops")]
        if budget is not None:
            keys += ["flops_per_step", "loss_at_equal_flops"]
        per[name] = {k: describe([row[k] for row in rows]) for k in keys}
        per[name].update(
            seeds=[r["seed"] for r in mine],
            time_limited_seeds=[r["seed"] for r in mine if time_limited(r)],
            zero_gradient=[{"seed": r["seed"], "steps": z} for r in mine
                           if (z := _zero_gradient_steps(r["history"]))],
            reference=_last([r.get("reference") for r in mine]),
            sampling=name != NO_ESTIMATOR and bool(registry.get(name).samples))
        if all(r.get("drift") for r in mine):  # --regime finetune
            per[name].update(finetune_stats(mine))
    comparisons = []
    for metric in TESTED:
        per_seed = {n: {s: v[metric] for s, v in values[n].items()} for n in names}
        if any(v is not None for d in per_seed.values() for v in d.values()):
            comparisons += compare_pairs(per_seed, metric, names, BASELINE)
    return {"task": task.name, "task_config": task.config(), "args": args,
            "cell": args.get("cell") or "default", "settings": runs[0].get("settings"),
            "equal_time_seconds": equal_time, "target_loss": target, "flops_budget": budget,
            "chance_purity": (1.0 / task.num_classes) if task.has_truth else None,
            "fields": list(FIELDS), "estimators": per, "comparisons": comparisons,
            "baseline": BASELINE if BASELINE in names else names[0],
            "alpha": ALPHA, "min_paired_seeds": MIN_PAIRED,
            "time_limited_runs": [{"estimator": r["estimator"], "seed": r["seed"],
                                   "steps": r["steps"]} for r in runs if time_limited(r)]}


# ------------------------------------------------------------------ reading documents

def by_tau(d: dict, tau):
    """d keyed by tau (a float in memory, a string after a JSON round trip)."""
    if not isinstance(d, dict):
        return None
    for k, v in d.items():
        try:
            if float(k) == float(tau):
                return v
        except (TypeError, ValueError):
            continue
    return None


def effect_vs_baseline(doc: dict, name: str, metric: str) -> Optional[dict]:
    """The comparison of ``name`` against ``topk`` on ``metric`` in one cell, oriented as
    name - topk (None if the cell has no such comparison)."""
    for c in doc.get("comparisons") or []:
        if c["metric"] != metric:
            continue
        if (c["a"], c["b"]) == (name, BASELINE):
            return c
        if (c["a"], c["b"]) == (BASELINE, name):
            ci = c.get("ci95")
            return {**c, "a": name, "b": BASELINE,
                    "mean_diff": None if c["mean_diff"] is None else -c["mean_diff"],
                    "ci95": [-ci[1], -ci[0]] if ci else None,
                    "t": None if c.get("t") is None else -c["t"]}
    return None


def grid_metrics(docs: list[dict]) -> list[str]:
    present = {c["metric"] for d in docs for c in d.get("comparisons") or []}
    return [m for m in TESTED if m in present]


def grid_names(docs: list[dict]) -> list[str]:
    names = list(dict.fromkeys(n for d in docs for n in d["estimators"]))
    return [n for n in names if n != BASELINE]
