"""Aggregate the runs of a study into ``metrics.json`` and ``report.md``; summarise a grid.

Every number in the report is computed from the runs. Every verdict sentence ("lower than
`topk` by ..., p = ... after Holm correction") is generated from a paired t-test across seeds
(:mod:`moegrad.study.stats`), never from means alone; with fewer than
:data:`~moegrad.study.stats.MIN_PAIRED` paired seeds the report says that no test was possible.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from moegrad import estimators as registry
from moegrad.study.stats import ALPHA, MIN_PAIRED, clean, compare_pairs, describe

#: metrics.json fields of every estimator, each {"mean", "sd", "std" (= sd), "ci95", "n",
#: "values"}; sd is the sample sd over seeds, ci95 the t-based 95% interval of the mean.
#: cos_exact is the cosine of the mean of diag_samples sampled gradients to the exact one,
#: cos_exact_sample the mean per-sample cosine (equal for deterministic estimators), both
#: averaged over the diagnostics after step 0 (step 0 apart: cos_exact_initial). Each
#: estimator also has "reference" (the exact reference's forward weight rule), "sampling"
#: (bool), "seeds", "time_limited_seeds" and "zero_gradient" (own-trajectory diagnostics where
#: the router gradient was exactly zero); with FLOP counts also "flops_per_step" and
#: "loss_at_equal_flops".
FIELDS = ("final_loss", "purity", "dead_experts", "load_cv", "max_violation", "entropy",
          "cos_exact", "cos_exact_sample", "cos_dense", "rel_err_exact", "grad_variance",
          "ms_per_step", "steps", "loss_at_equal_time", "steps_to_target")

#: metrics compared by paired tests across seeds: doc key -> the words used in sentences
TESTED = {"final_loss": "final validation loss", "purity": "routing purity",
          "loss_at_equal_flops": "validation loss at equal FLOPs"}
BASELINE = "topk"
DAGGER = "†"


# ----------------------------------------------------------------------------------- per run

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


# ----------------------------------------------------------------------------------- aggregate

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
            sampling=bool(registry.get(name).samples))
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


# ----------------------------------------------------------------------------------- formatting

def _n(stat: dict) -> int:
    return stat.get("n", len(clean(stat.get("values", []))))


def _sd(stat: dict):
    return stat.get("sd", stat.get("std"))


def fmt(stat: dict, digits: int = 3) -> str:
    """"mean ± sample sd" (the mean alone for one value, n/a for none)."""
    if stat is None or stat.get("mean") is None:
        return "n/a"
    if _sd(stat) is None or _n(stat) < 2:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {_sd(stat):.{digits}f}"


def fmt_ci(stat: dict, digits: int = 3) -> str:
    ci = stat.get("ci95") if stat else None
    if not ci:
        return "n/a"
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def num(x: Optional[float]) -> str:
    """A difference or bound with 3 significant digits (no exponent for |x| >= 1e-4)."""
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:.0f}"
    if abs(x) < 1e-4:
        return f"{x:.1e}"
    return f"{x:.3g}"


def pval(p: Optional[float]) -> str:
    if p is None:
        return "n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _names(doc: dict) -> list[str]:
    return list(doc["estimators"])


def _flag(per: dict, name: str) -> str:
    return f" {DAGGER}" if per.get(name, {}).get("time_limited_seeds") else ""


def _limited_words(per: dict, *names: str) -> str:
    parts = []
    for name in names:
        seeds = per.get(name, {}).get("time_limited_seeds") or []
        if seeds:
            parts.append(f"`{name}` seed{'s' if len(seeds) > 1 else ''} "
                         + ", ".join(str(s) for s in seeds))
    return "; stopped by the time budget: " + "; ".join(parts) if parts else ""


def verdict(c: dict, per: Optional[dict] = None) -> str:
    """One comparison of ``doc["comparisons"]`` -> its sentence, decided by its test."""
    what = TESTED.get(c["metric"], c["metric"])
    a, b, n, d = c["a"], c["b"], c["n"], c["mean_diff"]
    tail = _limited_words(per or {}, a, b)
    if d is None:
        return f"`{a}` vs `{b}`, {what}: no seed with a value for both; no comparison{tail}."
    if not c.get("tested", c.get("p") is not None):
        return (f"`{a}` vs `{b}`, {what}: {n} seed{'s' if n != 1 else ''}: too few for a test "
                f"({MIN_PAIRED} paired seeds needed); means only, no verdict (mean difference "
                f"{num(d)}){tail}.")
    if c.get("identical"):
        return (f"`{a}`: {what} identical to `{b}` in every one of the n = {n} seeds "
                f"(difference exactly 0){tail}.")
    lo, hi = c["ci95"]
    if c["significant"]:
        word = "lower" if d < 0 else "higher"
        if d < 0:
            d, lo, hi = -d, -hi, -lo
        return (f"`{a}`: {what} {word} than `{b}` by {num(d)} (uncorrected 95% CI {num(lo)} to "
                f"{num(hi)}), "
                f"{pval(c['p_holm'])} after Holm correction, n = {n} seeds{tail}.")
    return (f"`{a}`: {what} not distinguishable from `{b}` ({pval(c['p_holm'])} after Holm "
            f"correction, n = {n} seeds; difference {num(d)}, uncorrected 95% CI {num(lo)} to "
            f"{num(hi)})"
            f"{tail}.")


def verdict_groups(doc: dict) -> tuple[list[str], list[str]]:
    """(sentences against the baseline, sentences about the other pairs): every estimator
    against the baseline (``topk`` when it ran), metric by metric; then the other pairs that
    differ significantly after correction, and how many others do not."""
    comps = doc.get("comparisons")
    if comps is None:
        return (["This document has no paired tests (written by an older moegrad study); "
                 "no verdict."], [])
    per = doc["estimators"]
    base = doc.get("baseline", BASELINE)
    first = [verdict(c, per) for c in comps if base in (c["a"], c["b"])]
    others = [c for c in comps if base not in (c["a"], c["b"])]
    sig = [c for c in others if c["significant"]]
    rest = [verdict(c, per) for c in sig]
    tested = [c for c in others if c.get("tested")]
    if tested and len(sig) < len(tested):
        rest.append(f"The other {len(tested) - len(sig)} tested pairs not involving `{base}` are "
                    f"not distinguishable after Holm correction (table below).")
    return first, rest


def verdicts(doc: dict) -> list[str]:
    """Every verdict sentence of the report, each generated from a paired test."""
    first, rest = verdict_groups(doc)
    return first + rest


def _per_seed_count(doc: dict, name: str, test) -> tuple[int, int]:
    vals = clean(doc["estimators"][name].get("purity", {}).get("values", []))
    return sum(1 for v in vals if test(v)), len(vals)


def observations(doc: dict) -> list[str]:
    """Descriptive facts (no ranking): seeds, time-limited runs, machine-dependent timing,
    purity per seed, zero router gradients, what the gradient cosines were measured on."""
    per = doc["estimators"]
    a = doc["args"]
    out = []
    seeds = a.get("seeds") or max((_n(per[n]["final_loss"]) for n in per), default=0)
    if seeds < MIN_PAIRED:
        out.append(f"{seeds} seed{'s' if seeds != 1 else ''}: too few for a paired test "
                   f"({MIN_PAIRED} needed); the tables give means only and no verdict is drawn.")
    limited = doc.get("time_limited_runs")
    if limited is None:
        limited = [{"estimator": n, "seed": s, "steps": None} for n in per
                   for s in per[n].get("time_limited_seeds", [])]
    if limited:
        out.append(f"Runs stopped by the time budget ({a.get('time_budget')} s) before "
                   f"{a.get('steps')} steps, marked {DAGGER} in every table: "
                   + ", ".join(f"`{r['estimator']}` seed {r['seed']}"
                               + (f" ({r['steps']} steps)" if r.get("steps") is not None else "")
                               for r in limited)
                   + ". Their final values come from fewer steps than the others'.")
    else:
        out.append("No run was stopped by the time budget: every run trained its full step "
                   "budget.")
    out.append("Time per step and loss at equal wall-clock time depend on the machine and its "
               "load; they are reported for this machine only and no verdict is drawn from them.")
    if BASELINE in per and per[BASELINE]["ms_per_step"]["mean"]:
        base = per[BASELINE]["ms_per_step"]["mean"]
        costly = [f"`{n}` {per[n]['ms_per_step']['mean'] / base:.2f}x" for n in per
                  if n != BASELINE and per[n]["ms_per_step"]["mean"] > 1.2 * base]
        out.append("On this machine, time per step relative to `topk` above 1.2x: "
                   + (", ".join(costly) if costly else "none") + ".")
    chance = doc.get("chance_purity")
    if chance is not None:
        good = []
        near = []
        for n in per:
            k, m = _per_seed_count(doc, n, lambda v: v >= 0.9)
            if m:
                good.append(f"`{n}` {k} of {m}")
            k, m = _per_seed_count(doc, n, lambda v: v <= chance + 0.1)
            if k:
                near.append(f"`{n}` {k} of {m}")
        out.append("Purity >= 0.9 (each cluster routed to its own expert), seeds per estimator: "
                   + (", ".join(good) or "none") + ".")
        if near:
            out.append(f"Purity within 0.1 of chance ({chance:.2f}), i.e. the router never "
                       f"learned the clusters, seeds per estimator: {', '.join(near)}.")
    fid = doc.get("fidelity")
    if fid:
        out += fidelity_sentences(fid, doc)
    else:
        out += _own_trajectory_sentences(doc)
    dead = [n for n in per if (per[n]["dead_experts"]["mean"] or 0) >= 1]
    if dead:
        cfg = doc.get("task_config", {})
        spare = ""
        if chance is not None and cfg.get("num_experts", 0) > cfg.get("num_classes", 0):
            spare = (f" With {cfg['num_experts']} experts for {cfg['num_classes']} clusters, up "
                     f"to {cfg['num_experts'] - cfg['num_classes']} idle experts are expected at "
                     "the optimum.")
        out.append("Experts without any token over the last window (dead), mean over seeds: "
                   + ", ".join(f"`{n}` {per[n]['dead_experts']['mean']:.1f}" for n in dead)
                   + "." + spare)
    return out


def _own_trajectory_sentences(doc: dict) -> list[str]:
    per = doc["estimators"]
    out = []
    cos = [n for n in per if per[n]["cos_exact"]["mean"] is not None]
    if not cos:
        return out
    out.append("Gradient cosines are measured on each estimator's own training trajectory "
               "(different weights for each estimator), so they describe each run and do not "
               f"rank the estimators; {_step0_words(doc)} is reported apart and left out of the "
               "means.")
    zero = [n for n in per if per[n].get("zero_gradient")]
    if zero:
        parts = []
        for n in zero:
            z = per[n]["zero_gradient"]
            first = min(min(e["steps"]) for e in z)
            parts.append(f"`{n}` in {len(z)} of {len(per[n]['seeds'])} seeds (first at step "
                         f"{first})")
        out.append("Router gradient exactly zero at some diagnostic step (no task gradient "
                   "reaches the router there): " + ", ".join(parts) + ".")
    sampled = [n for n in cos if per[n]["sampling"] and per[n]["cos_exact_sample"]["mean"] is not None]
    if sampled:
        r = doc["args"].get("diag_samples")
        out.append(f"Sampling estimators train on one sample per step; cosine per sample vs "
                   f"cosine of the mean of {r} samples (after step 0): "
                   + ", ".join(f"`{n}` {per[n]['cos_exact_sample']['mean']:.2f} vs "
                               f"{per[n]['cos_exact']['mean']:.2f}" for n in sampled) + ".")
    return out


def _by_tau(d: dict, tau):
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


def _step0_words(doc: dict) -> str:
    """Why step 0 is apart: with a zero-initialised router (the default, and what runs without
    recorded settings used) `dense` equals the reference there by construction."""
    init = (doc.get("settings") or {}).get("router_init", "zero")
    if init == "zero":
        return ("step 0 (the router at its initialisation, where a zero router makes `dense` "
                "equal to the reference by construction)")
    return f"step 0 (the router at its {init} initialisation)"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def fidelity_sentences(fid: dict, doc: Optional[dict] = None) -> list[str]:
    """doc["fidelity"] (shared checkpoints) -> sentences: what was measured, exact zeros, and
    whether the ordering by mean cosine moves with the reference's temperature tau."""
    taus = fid.get("taus", [])
    cks = fid.get("checkpoints", [])
    est = fid.get("estimators", {})
    later = [c for c in cks if c.get("step", 0) > 0]
    out = [f"Gradient fidelity measured on {len(cks)} shared checkpoints (steps "
           f"{', '.join(str(c.get('step')) for c in cks)}): every estimator's router gradient at "
           f"the same weights, against the exact expected-loss gradient at tau = "
           f"{', '.join(str(t) for t in taus)}; means over the {_plural(len(later), 'checkpoint')} "
           f"after step 0; {_step0_words(doc or {})} reported apart."]
    for name, e in est.items():
        z = e.get("zero_gradient_at") or []
        if z:
            out.append(f"`{name}`: router gradient exactly zero on {len(z)} of {len(cks)} shared "
                       f"checkpoints ({', '.join(str(x) for x in z)}): no task gradient reaches "
                       f"the router there.")
    if len(taus) > 1:
        tops = []
        for tau in taus:
            vals = {n: _by_tau(e.get("mean_after_step0", {}), tau) for n, e in est.items()}
            vals = {n: v for n, v in vals.items() if v is not None}
            if vals:
                tops.append((tau, max(vals, key=vals.get)))
        if len({t for _, t in tops}) > 1:
            out.append("The estimator with the highest mean cosine changes with the reference's "
                       "temperature (" + ", ".join(f"tau = {t}: `{n}`" for t, n in tops)
                       + "): the fidelity ordering depends on tau.")
    return out


def conclusions(doc: dict) -> list[str]:
    """The report's sentences: verdicts from the tests, then descriptive observations."""
    return verdicts(doc) + observations(doc)


# ----------------------------------------------------------------------------------- report.md

_SETTING_NAMES = {"task": "task", "regime": "regime", "top_k": "experts per token (top-k)",
                  "num_experts": "experts per MoE layer", "losses": "balance losses",
                  "router_init": "router initialisation", "lr": "learning rate (Adam)",
                  "num_classes": "clusters", "dim": "model dimension", "layers": "layers"}


def _losses_text(losses) -> str:
    if not losses:
        return "none"
    if isinstance(losses, dict):
        return ", ".join(f"{k}={v}" for k, v in losses.items())
    return str(losses)


def settings_lines(doc: dict) -> list[str]:
    """The cell's settings as a table, and the budget (seeds, steps, time)."""
    s = doc.get("settings")
    a = doc["args"]
    lines = ["## Settings", ""]
    if s:
        lines += ["| setting | value |", "|---|---|"]
        for k, v in s.items():
            lines.append(f"| {_SETTING_NAMES.get(k, k)} | "
                         f"{_losses_text(v) if k == 'losses' else v} |")
        lines.append("")
    else:
        lines += ["The runs did not record their settings (older moegrad study).", ""]
    lines.append(f"Task config: `{json.dumps(doc.get('task_config', {}))}`.")
    seeds = a.get("seeds")
    quick = " (`--quick`)" if a.get("quick") else ""
    lines += ["", f"Budget per run{quick}: {a.get('steps')} steps or {a.get('time_budget')} s of "
              f"training time, whichever comes first; {seeds} seeds (0..{(seeds or 1) - 1}), the "
              f"same seed giving every estimator the same data and initial weights; balance "
              f"losses {_losses_text(a.get('losses'))}. Wall-clock figures are machine-dependent.",
              ""]
    return lines


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def _dagger_note(per: dict) -> list[str]:
    if any(per[n].get("time_limited_seeds") for n in per):
        return ["", f"{DAGGER} some runs of this estimator were stopped by the time budget "
                    "before their step budget (fewer steps; see the observations)."]
    return []


def write_report(doc: dict, out: Path, command: str) -> None:
    """Write metrics.json and report.md into ``out``."""
    out = Path(out)
    (out / "metrics.json").write_text(json.dumps(doc, indent=1))
    per = doc["estimators"]
    names = _names(doc)
    a = doc["args"]
    has_purity = doc.get("chance_purity") is not None
    has_bpc = any(per[n].get("bits_per_char", {}).get("mean") is not None for n in per)
    has_cos = any(per[n]["cos_exact"]["mean"] is not None for n in per)
    has_flops = doc.get("flops_budget") is not None and all("loss_at_equal_flops" in per[n]
                                                            for n in per)
    lines = [f"# moegrad study: `{doc['task']}`, cell `{doc.get('cell', 'default')}`", "",
             f"Reproduce: `{command}`", ""]
    lines += settings_lines(doc)

    lines += ["## Verdicts", "",
              f"Paired t-tests across seeds (same seed = same data and initialisation), "
              f"Holm-corrected over all pairs of a metric; significant means p < {ALPHA} after "
              f"correction. With fewer than {MIN_PAIRED} paired seeds no test is made. The 95% "
              "confidence intervals of the differences are per comparison (not corrected for "
              "the number of pairs): an interval that excludes 0 can still be not significant "
              "after Holm's correction.", ""]
    first, rest = verdict_groups(doc)
    lines += [f"Against `{doc.get('baseline', BASELINE)}`:", ""] + [f"- {v}" for v in first]
    if rest:
        lines += ["", "Other pairs:", ""] + [f"- {v}" for v in rest]

    lines += ["", "## Outcome", "",
              "Mean ± sample standard deviation over seeds, and the t-based 95% confidence "
              "interval of the mean.", ""]
    head = ["estimator", "seeds", "final validation loss", "95% CI"]
    if has_bpc:
        head += ["bits per character", "95% CI"]
    if has_purity:
        head += ["purity", "95% CI", "seeds with purity >= 0.9"]
    head += ["steps trained", "runs stopped by time"]
    rows = []
    for name in names:
        m = per[name]
        row = [f"`{name}`{_flag(per, name)}", str(_n(m["final_loss"])), fmt(m["final_loss"], 4),
               fmt_ci(m["final_loss"], 4)]
        if has_bpc:
            row += [fmt(m["bits_per_char"]), fmt_ci(m["bits_per_char"])]
        if has_purity:
            k, n = _per_seed_count(doc, name, lambda v: v >= 0.9)
            row += [fmt(m["purity"], 2), fmt_ci(m["purity"], 2), f"{k} of {n}"]
        row += [fmt(m["steps"], 0), str(len(m.get("time_limited_seeds") or []))]
        rows.append(row)
    lines += _table(head, rows) + _dagger_note(per)

    if all("drift_js" in per[n] for n in names):
        lines += ["", "## Fine-tuning: before and after, and routing drift", "",
                  "Held-out loss on the shifted distribution at the pretrained checkpoint "
                  "(measured under each estimator's own forward, so estimators whose forward "
                  "differs from `topk`'s start elsewhere) and after fine-tuning; routing drift "
                  "between the start and the end of fine-tuning (eval mode, validation inputs), "
                  "mean over layers for overlap and JS, summed over layers for experts. Mean ± "
                  "sample sd over seeds.", ""]
        head = ["estimator", "loss before", "loss after", "top-k overlap with start",
                "JS divergence (nats)", "experts revived", "experts killed"]
        rows = [[f"`{n}`{_flag(per, n)}", fmt(per[n]["loss_before"], 4),
                 fmt(per[n]["final_loss"], 4), fmt(per[n]["drift_topk_overlap"], 3),
                 fmt(per[n]["drift_js"], 4), fmt(per[n]["experts_revived"], 1),
                 fmt(per[n]["experts_killed"], 1)] for n in names]
        lines += _table(head, rows) + _dagger_note(per)

    lines += ["", "## Routing health", "",
              "At the end of training, over the last window of steps; mean ± sample sd over "
              "seeds.", ""]
    head = ["estimator", "dead experts", "load coefficient of variation", "max load violation",
            "router entropy"]
    rows = [[f"`{n}`{_flag(per, n)}", fmt(per[n]["dead_experts"], 1), fmt(per[n]["load_cv"], 2),
             fmt(per[n]["max_violation"], 2), fmt(per[n]["entropy"], 2)] for n in names]
    lines += _table(head, rows) + _dagger_note(per)
    lines += ["", "*dead experts*: experts without a token over the last window; *load "
              "coefficient of variation*: sd / mean of the per-expert share of tokens; *max load "
              "violation*: max load / mean load - 1; *router entropy*: entropy of the router's "
              "scores, normalised (1 = uniform)."]

    lines += ["", "## Compute", ""]
    head = ["estimator"]
    if has_flops:
        head += ["FLOPs per step", f"loss at equal FLOPs ({doc['flops_budget']:.3g})", "95% CI"]
    head += [f"steps to loss {doc['target_loss']:.3f}", "ms per step (this machine)",
             f"loss at equal wall time ({doc['equal_time_seconds']:.1f} s, this machine)"]
    rows = []
    for n in names:
        m = per[n]
        row = [f"`{n}`{_flag(per, n)}"]
        if has_flops:
            fps = m["flops_per_step"]["mean"]
            row += [f"{fps:.3g}" if fps is not None else "n/a", fmt(m["loss_at_equal_flops"], 4),
                    fmt_ci(m["loss_at_equal_flops"], 4)]
        row += [fmt(m["steps_to_target"], 0), fmt(m["ms_per_step"], 1),
                fmt(m["loss_at_equal_time"], 4)]
        rows.append(row)
    lines += _table(head, rows) + _dagger_note(per)
    notes = []
    if has_flops:
        notes.append(f"*loss at equal FLOPs*: validation loss at the last evaluation within "
                     f"{doc['flops_budget']:.3g} training FLOPs (forward and backward, counted "
                     "from the evaluated token-expert pairs, including the unselected ones for "
                     "`dense`), the total of the cheapest run not stopped by the clock; n/a for a "
                     "run that stopped before it.")
    notes.append(f"*steps to loss*: first evaluated step at or below the median final loss "
                 f"{doc['target_loss']:.3f} (n/a: never). *ms per step* (median) and *loss at "
                 "equal wall time* (after the training time of the shortest run) are "
                 "machine-dependent: they change with the CPU and its load.")
    lines += [""] + notes

    comps = doc.get("comparisons") or []
    if comps:
        lines += ["", "## Paired comparisons", "",
                  "Mean difference a - b over seeds, its 95% CI, the paired t statistic, the "
                  "two-sided p-value and the Holm-corrected p-value (over all pairs of the "
                  "metric).", ""]
        head = ["metric", "a", "b", "seeds", "mean difference a - b", "95% CI", "t", "p",
                "p after Holm", "result"]
        rows = []
        for c in comps:
            if not c.get("tested", c.get("p") is not None):
                result = "too few seeds"
            elif c.get("identical"):
                result = "identical"
            else:
                result = "significant" if c["significant"] else "not distinguishable"
            ci = c.get("ci95")
            rows.append([TESTED.get(c["metric"], c["metric"]), f"`{c['a']}`{_flag(per, c['a'])}",
                         f"`{c['b']}`{_flag(per, c['b'])}", str(c["n"]), num(c["mean_diff"]),
                         f"[{num(ci[0])}, {num(ci[1])}]" if ci else "n/a",
                         f"{c['t']:.2f}" if c.get("t") is not None else "n/a",
                         pval(c.get("p")).replace("p = ", "").replace("p ", ""),
                         pval(c.get("p_holm")).replace("p = ", "").replace("p ", ""), result])
        lines += _table(head, rows) + _dagger_note(per)

    fid = doc.get("fidelity")
    if fid:
        lines += ["", "## Router-gradient fidelity (shared checkpoints)", ""]
        lines += fidelity_table(fid)
    elif has_cos:
        r = a.get("diag_samples")
        lines += ["", "## Router-gradient fidelity (each estimator's own trajectory)", "",
                  "Measured during each run on that run's own weights, so the estimators are "
                  "not compared at the same point; step 0 apart, the other columns average the "
                  "diagnostics after step 0 (mean ± sample sd over seeds).", ""]
        head = ["estimator", "cos exact at step 0", "cos exact (one sample)",
                f"cos exact (mean of {r} samples)", "cos dense", "gradient variance",
                "exact reference", "zero router gradient (seed: steps)"]
        rows = []
        for n in names:
            m = per[n]
            z = "; ".join(f"{e['seed']}: {', '.join(str(s) for s in e['steps'])}"
                          for e in m.get("zero_gradient") or []) or "never"
            rows.append([f"`{n}`{_flag(per, n)}", fmt(m.get("cos_exact_initial"), 2),
                         fmt(m["cos_exact_sample"], 2), fmt(m["cos_exact"], 2),
                         fmt(m["cos_dense"], 2), fmt(m["grad_variance"], 2),
                         m.get("reference") or "n/a", z])
        lines += _table(head, rows) + _dagger_note(per)
        lines += ["", "*cos exact*: cosine of the router gradient to the exact gradient of the "
                  "expected loss of top-k sampled from softmax(z / "
                  f"{a.get('tau')}), every subset enumerated, with the forward weights named in "
                  "*exact reference* (each estimator is compared with the model its own forward "
                  "computes: softmax weights w = s_i for topk/dense/default_moe, unit weights for "
                  "straight_through/unweighted/hard gumbel); *one sample* is the cosine of a "
                  "single sampled gradient (what one training step uses), *mean of "
                  f"{r} samples* the cosine of their mean (equal for deterministic estimators); "
                  "*cos dense*: cosine of the mean gradient to the dense-mixture gradient; "
                  "*gradient variance*: variance of sampled gradients relative to the exact "
                  "gradient's squared norm (0 for deterministic estimators); *zero router "
                  "gradient*: diagnostic steps where the gradient was exactly zero."]

    lines += ["", "## Observations", ""]
    lines += [f"- {o}" for o in observations(doc)]
    notes = doc.get("plot_notes") or []
    lines += ["", "## Plots", ""]
    for png, what in (("loss_vs_step.png", "validation loss vs step"),
                      ("loss_vs_time.png", "validation loss vs training time (machine-dependent)"),
                      ("loss_vs_flops.png", "validation loss vs training FLOPs"),
                      ("load.png", "share of tokens per expert over training (first seed, first "
                                   "layer)"),
                      ("grad_cosine.png", "router-gradient cosine per estimator, after step 0 "
                                          "(own trajectories)"),
                      ("fidelity.png", "router-gradient cosine on shared checkpoints per tau"),
                      ("purity.png", "routing purity vs step")):
        if (out / png).exists():
            lines.append(f"- [{png}]({png}): {what}")
    lines += [f"- Note: {n}" for n in notes]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def fidelity_table(fid: dict) -> list[str]:
    taus = fid.get("taus", [])
    cks = fid.get("checkpoints", [])
    est = fid.get("estimators", {})
    head = (["estimator"] + [f"cos exact at step 0 (tau = {t})" for t in taus]
            + [f"mean cos exact after step 0 (tau = {t})" for t in taus]
            + ["checkpoints with zero router gradient"])
    rows = []
    for name, e in est.items():
        row = [f"`{name}`"]
        for t in taus:
            v = _by_tau(e.get("step0", {}), t)
            row.append(f"{v:.2f}" if v is not None else "n/a")
        for t in taus:
            v = _by_tau(e.get("mean_after_step0", {}), t)
            row.append(f"{v:.2f}" if v is not None else "n/a")
        z = e.get("zero_gradient_at") or []
        row.append(f"{len(z)} of {len(cks)}" + (f" ({', '.join(str(x) for x in z)})" if z else ""))
        rows.append(row)
    return _table(head, rows) + [
        "", "*cos exact*: cosine of the estimator's router gradient to the exact gradient of the "
        "expected loss of top-k sampled from softmax(z / tau), every subset enumerated, measured "
        "for every estimator on the same checkpoints (labels: "
        + ", ".join(f"{c.get('label')} = step {c.get('step')}" for c in cks) + ")."]


# ----------------------------------------------------------------------------------- grid summary

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


def summary_entry(doc: dict, name: str, metric: str) -> str:
    """One cell of a summary table: "diff [lo, hi] marker" with * significant after Holm,
    n.s. not distinguishable, "(n = 2, no test)" too few seeds; † time-limited runs."""
    per = doc["estimators"]
    if name not in per:
        return "not run"
    if BASELINE not in per:
        return "no topk"
    c = effect_vs_baseline(doc, name, metric)
    if c is None or c["mean_diff"] is None:
        return "n/a"
    flag = DAGGER if (per[name].get("time_limited_seeds")
                      or per[BASELINE].get("time_limited_seeds")) else ""
    if not c.get("tested", c.get("p") is not None):
        return f"{num(c['mean_diff'])} (n = {c['n']}, no test){flag}"
    if c.get("identical"):
        return f"0 (identical){flag}"
    lo, hi = c["ci95"]
    mark = "*" if c["significant"] else "n.s."
    return f"{num(c['mean_diff'])} [{num(lo)}, {num(hi)}] {mark}{flag}"


def _grid_metrics(docs: list[dict]) -> list[str]:
    present = {c["metric"] for d in docs for c in d.get("comparisons") or []}
    return [m for m in TESTED if m in present]


def _grid_names(docs: list[dict]) -> list[str]:
    names = list(dict.fromkeys(n for d in docs for n in d["estimators"]))
    return [n for n in names if n != BASELINE]


def _cell_settings(doc: dict) -> str:
    s = doc.get("settings")
    if not s:
        return f"task {doc.get('task')} (settings not recorded)"
    return ", ".join(f"{k}={_losses_text(v) if k == 'losses' else v}" for k, v in s.items())


def write_grid_summary(docs: list[dict], out: Path, command: str) -> None:
    """Per-cell documents (from :func:`aggregate`) -> ``out/summary.md`` (one table per tested
    metric: rows estimators, columns cells, entries "difference vs topk [95% CI] marker") and
    ``out/summary.png`` (the same effect sizes with CI bars, filled markers where significant
    after Holm)."""
    if not docs:
        raise ValueError("write_grid_summary needs at least one cell document, got docs=[]")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = [d.get("cell", f"cell {i}") for i, d in enumerate(docs)]
    names = _grid_names(docs)
    lines = ["# moegrad study: grid summary", "", f"Reproduce: `{command}`", "",
             "## Cells", ""]
    rows = []
    for cell, d in zip(cells, docs):
        seeds = d.get("args", {}).get("seeds")
        limited = len(d.get("time_limited_runs") or [])
        rows.append([f"`{cell}`", _cell_settings(d), str(seeds), str(d.get("args", {}).get("steps")),
                     str(limited)])
    lines += _table(["cell", "settings", "seeds", "steps", "runs stopped by time"], rows)
    lines += ["", "Entries: mean difference estimator - `topk` over seeds [uncorrected 95% CI "
              "of the paired difference]; `*` significant (paired t-test, p < "
              f"{ALPHA} after Holm correction within the cell and metric), `n.s.` not "
              f"distinguishable; `no test` fewer than {MIN_PAIRED} paired seeds (means only); "
              f"{DAGGER} some runs of the estimator or of `topk` stopped by the time budget. "
              "Negative loss differences and positive purity differences favour the estimator.",
              ""]
    for metric in _grid_metrics(docs):
        lines += [f"## {TESTED[metric]} vs `topk`", ""]
        rows = [[f"`{n}`"] + [summary_entry(d, n, metric) for d in docs] for n in names]
        base = ["`topk` (mean ± sd)"]
        for d in docs:
            st = d["estimators"].get(BASELINE, {}).get(metric)
            base.append(fmt(st, 4) if st else "not run")
        lines += _table(["estimator"] + [f"`{c}`" for c in cells], rows + [base]) + [""]
    if not _grid_metrics(docs):
        lines += ["No paired comparisons in these documents.", ""]
    lines += ["![effect sizes vs topk](summary.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))
    from moegrad.study.plots import write_summary_plot

    write_summary_plot(docs, out / "summary.png")
