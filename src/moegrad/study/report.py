"""Aggregate the runs of a study into ``metrics.json`` and ``report.md``.

Every number in the report is computed from the runs; the conclusions are rules applied to
those numbers (thresholds stated next to them), not text written in advance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean, pstdev
from typing import Optional

from moegrad import estimators as registry

#: metrics.json fields of every estimator, each {"mean", "std", "values"}; cos_exact is the cosine
#: of the mean of diag_samples sampled gradients to the exact one, cos_exact_sample the mean
#: per-sample cosine (equal for deterministic estimators). Each estimator also has "reference"
#: (the exact reference's forward weight rule), "sampling" (bool) and "seeds".
FIELDS = ("final_loss", "purity", "dead_experts", "load_cv", "max_violation", "entropy",
          "cos_exact", "cos_exact_sample", "cos_dense", "rel_err_exact", "grad_variance",
          "ms_per_step", "steps", "loss_at_equal_time", "steps_to_target")


def _stat(values: list) -> dict:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None, "values": values}
    return {"mean": mean(vals), "std": pstdev(vals) if len(vals) > 1 else 0.0, "values": values}


def _last(xs: list):
    vals = [x for x in xs if x is not None]
    return vals[-1] if vals else None


def _avg(xs: list):
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def loss_at_time(run: dict, t: float) -> Optional[float]:
    """Validation loss of the last evaluation at training time <= t."""
    h = run["history"]
    best = None
    for when, loss in zip(h["eval_time"], h["val_loss"]):
        if when <= t + 1e-9:
            best = loss
    return best


def steps_to(run: dict, target: float) -> Optional[int]:
    """First evaluated step whose validation loss is <= target (None if never)."""
    h = run["history"]
    for step, loss in zip(h["eval_step"], h["val_loss"]):
        if loss <= target:
            return step
    return None


def aggregate(runs: list[dict], task, args: dict) -> dict:
    """runs (from :func:`moegrad.study.train.train_run`) -> the metrics.json document."""
    names = list(dict.fromkeys(r["estimator"] for r in runs))
    equal_time = min(r["train_time"] for r in runs)
    finals = [r["history"]["val_loss"][-1] for r in runs]
    # target: the loss that the median estimator reaches at the end (per-seed median over runs)
    target = sorted(finals)[len(finals) // 2]
    per = {}
    for name in names:
        mine = [r for r in runs if r["estimator"] == name]
        hs = [r["history"] for r in mine]
        per[name] = {
            "final_loss": _stat([h["val_loss"][-1] for h in hs]),
            "purity": _stat([_last(h["purity"]) for h in hs]),
            "bits_per_char": _stat([_last(h["bits_per_char"]) for h in hs]),
            "dead_experts": _stat([h["dead"][-1] for h in hs]),
            "load_cv": _stat([h["load_cv"][-1] for h in hs]),
            "max_violation": _stat([h["max_violation"][-1] for h in hs]),
            "entropy": _stat([_last(h["entropy"]) for h in hs]),
            "cos_exact": _stat([_avg(h["cos_exact"]) for h in hs]),
            "cos_exact_sample": _stat([_avg(h["cos_exact_sample"]) for h in hs]),
            "cos_dense": _stat([_avg(h["cos_dense"]) for h in hs]),
            "cos_exact_initial": _stat([h["cos_exact"][0] if h["cos_exact"] else None for h in hs]),
            "rel_err_exact": _stat([_avg(h["rel_err_exact"]) for h in hs]),
            "grad_variance": _stat([_avg(h["variance"]) for h in hs]),
            "ms_per_step": _stat([r["ms_per_step"] for r in mine]),
            "steps": _stat([r["steps"] for r in mine]),
            "loss_at_equal_time": _stat([loss_at_time(r, equal_time) for r in mine]),
            "steps_to_target": _stat([steps_to(r, target) for r in mine]),
            "seeds": [r["seed"] for r in mine],
            "reference": _last([r.get("reference") for r in mine]),
            "sampling": bool(registry.get(name).samples),
        }
    return {"task": task.name, "task_config": task.config(), "args": args,
            "equal_time_seconds": equal_time, "target_loss": target,
            "chance_purity": (1.0 / task.num_classes) if task.has_truth else None,
            "fields": list(FIELDS), "estimators": per}


def fmt(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "n/a"
    if stat["std"] is None or len([v for v in stat["values"] if v is not None]) < 2:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def conclusions(doc: dict) -> list[str]:
    """Rules over the aggregated numbers -> sentences for the report."""
    per = doc["estimators"]
    out = []
    if doc["args"]["seeds"] < 2:
        out.append("One seed only: differences below a few percent may be noise; use --seeds 2 "
                   "or more before drawing conclusions.")
    by_loss = sorted(per, key=lambda n: per[n]["final_loss"]["mean"])
    best = by_loss[0]
    out.append(f"Lowest final validation loss at equal steps: `{best}` "
               f"({fmt(per[best]['final_loss'])}); order: " + " < ".join(f"`{n}`" for n in by_loss) + ".")
    timed = [n for n in per if per[n]["loss_at_equal_time"]["mean"] is not None]
    if timed:
        by_time = sorted(timed, key=lambda n: per[n]["loss_at_equal_time"]["mean"])
        out.append(f"At equal wall-clock time ({doc['equal_time_seconds']:.1f} s of training, the "
                   f"shortest run), the best is `{by_time[0]}` "
                   f"({fmt(per[by_time[0]]['loss_at_equal_time'])}).")
    if "topk" in per:
        base = per["topk"]["ms_per_step"]["mean"]
        costly = [f"`{n}` {per[n]['ms_per_step']['mean'] / base:.2f}x" for n in per
                  if n != "topk" and per[n]["ms_per_step"]["mean"] > 1.2 * base]
        if costly:
            out.append("Time per step relative to `topk` (more than 1.2x): " + ", ".join(costly) + ".")
        else:
            out.append("No estimator costs more than 1.2x the time per step of `topk` here.")
    chance = doc.get("chance_purity")
    if chance is not None:
        good = [n for n in per if (per[n]["purity"]["mean"] or 0) >= 0.9]
        near = [n for n in per if (per[n]["purity"]["mean"] or 0) <= chance + 0.1]
        out.append(f"Purity >= 0.9 (each cluster routed to its own expert): "
                   f"{', '.join(f'`{n}`' for n in good) or 'none'}.")
        if near:
            out.append(f"Purity within 0.1 of chance ({chance:.2f}), i.e. the router never learned "
                       f"the clusters: {', '.join(f'`{n}`' for n in near)}.")
    zero = [n for n in per if per[n]["cos_exact"]["mean"] is not None
            and abs(per[n]["cos_exact"]["mean"]) < 1e-9]
    if zero:
        out.append("Router task gradient identically zero (cosine 0 with the exact gradient): "
                   + ", ".join(f"`{n}`" for n in zero) + ".")
    cos = [n for n in per if per[n]["cos_exact_sample"]["mean"] is not None]
    if cos:
        top = max(cos, key=lambda n: per[n]["cos_exact_sample"]["mean"])
        out.append(f"Most faithful router gradient (mean cosine of a single step's gradient to the "
                   f"exact expected-loss gradient of its own forward, over training): `{top}` "
                   f"({fmt(per[top]['cos_exact_sample'])}).")
        sampled = [n for n in cos if per[n]["sampling"]]
        if sampled:
            r = doc["args"].get("diag_samples")
            out.append(f"Sampling estimators train on one sample per step; cosine per sample vs "
                       f"cosine of the mean of {r} samples: "
                       + ", ".join(f"`{n}` {per[n]['cos_exact_sample']['mean']:.2f} vs "
                                   f"{per[n]['cos_exact']['mean']:.2f}" for n in sampled) + ".")
    dead = [n for n in per if (per[n]["dead_experts"]["mean"] or 0) >= 1]
    if dead:
        cfg = doc.get("task_config", {})
        spare = ""
        if chance is not None and cfg.get("num_experts", 0) > cfg.get("num_classes", 0):
            spare = (f" With {cfg['num_experts']} experts for {cfg['num_classes']} clusters, up to "
                     f"{cfg['num_experts'] - cfg['num_classes']} idle experts are expected at the optimum.")
        out.append("Experts without any token over the last window (dead): "
                   + ", ".join(f"`{n}` {per[n]['dead_experts']['mean']:.1f}" for n in dead) + "." + spare)
    return out


def write_report(doc: dict, out: Path, command: str) -> None:
    """Write metrics.json and report.md into ``out``."""
    (out / "metrics.json").write_text(json.dumps(doc, indent=1))
    per = doc["estimators"]
    has_purity = doc.get("chance_purity") is not None
    has_bpc = any(per[n]["bits_per_char"]["mean"] is not None for n in per)
    has_cos = any(per[n]["cos_exact"]["mean"] is not None for n in per)
    a = doc["args"]
    lines = [f"# moegrad study: `{doc['task']}`", "",
             f"Reproduce: `{command}`", "",
             f"Task config: `{json.dumps(doc['task_config'])}`. Budget per run: {a['steps']} steps "
             f"or {a['time_budget']:.0f} s of training time, whichever comes first; seeds "
             f"{a['seeds']}; balance losses {a['losses'] or 'none'}. Values are mean ± std over "
             "seeds.", ""]
    head = ["estimator", "final val loss"]
    if has_bpc:
        head.append("bits/char")
    head += ["val loss @ equal time", f"steps to loss {doc['target_loss']:.3f}"]
    if has_purity:
        head.append("purity")
    head += ["dead", "load CV", "max vio", "entropy"]
    if has_cos:
        head += ["cos exact (per sample)", "cos exact (mean grad)", "cos dense", "grad var",
                 "exact reference"]
    head.append("ms/step")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in sorted(per, key=lambda n: per[n]["final_loss"]["mean"]):
        m = per[name]
        row = [f"`{name}`", fmt(m["final_loss"], 4)]
        if has_bpc:
            row.append(fmt(m["bits_per_char"]))
        row += [fmt(m["loss_at_equal_time"], 4), fmt(m["steps_to_target"], 0)]
        if has_purity:
            row.append(fmt(m["purity"], 2))
        row += [fmt(m["dead_experts"], 1), fmt(m["load_cv"], 2), fmt(m["max_violation"], 2),
                fmt(m["entropy"], 2)]
        if has_cos:
            row += [fmt(m["cos_exact_sample"], 2), fmt(m["cos_exact"], 2), fmt(m["cos_dense"], 2),
                    fmt(m["grad_variance"], 2), m["reference"] or "n/a"]
        row.append(fmt(m["ms_per_step"], 1))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Columns: *val loss @ equal time* is the validation loss after the training time "
              "of the shortest run; *steps to loss* the first evaluated step at or below the "
              "median final loss (n/a: never); *dead* experts without a token over the last "
              "window of steps; *load CV* std/mean of the per-expert load; *max vio* max load / "
              "mean load - 1; *entropy* of the router's scores (1 = uniform); *cos exact* the cosine of "
              "the router gradient to the exact gradient of the expected loss of top-k sampled "
              f"from softmax(z / {a['tau']}), every subset enumerated, with the forward weights "
              "named in *exact reference* (each estimator is compared with the model its own "
              "forward computes: softmax weights w = s_i for topk/dense/default_moe, unit weights "
              "for straight_through/unweighted/hard gumbel), averaged over training: *per sample* "
              "is the mean cosine of single sampled gradients (what one training step uses), "
              f"*mean grad* the cosine of the mean of {a.get('diag_samples')} samples (equal for "
              "deterministic estimators); *cos dense* the cosine of the mean gradient to the "
              "dense-mixture gradient; *grad var* the variance of sampled gradients relative to "
              "the exact gradient's squared norm (0 for deterministic estimators).", "",
              "## Conclusions", ""]
    lines += [f"- {c}" for c in conclusions(doc)]
    lines += ["", "## Plots", ""]
    for png, what in (("loss_vs_step.png", "validation loss vs step"),
                      ("loss_vs_time.png", "validation loss vs training time"),
                      ("load.png", "load per expert over training (first seed, first layer)"),
                      ("grad_cosine.png", "router-gradient cosine per estimator (exact: per sample "
                                       "and mean of samples; dense mixture)"),
                      ("purity.png", "routing purity vs step")):
        if (out / png).exists():
            lines.append(f"- [{png}]({png}): {what}")
    (out / "report.md").write_text("\n".join(lines) + "\n")
