"""``report.md`` and ``metrics.json`` of one study cell.

Every number in the report is computed from the runs (:mod:`moegrad.study.metrics`). Every
verdict sentence ("lower than `topk` by ..., p = ... after Holm correction") is generated from a
paired t-test across seeds (:mod:`moegrad.study.conclusions`), never from means alone; with fewer
than :data:`~moegrad.study.stats.MIN_PAIRED` paired seeds the report says that no test was
possible. The grid summary is :mod:`moegrad.study.summary`.
"""

from __future__ import annotations

import json
from pathlib import Path

from moegrad.study.conclusions import (conclusions, fidelity_sentences, observations, purity_count,
                                       verdict, verdict_groups, verdicts)
from moegrad.study.markdown import (DAGGER, count, dagger_note, flag, fmt, fmt_ci, losses_text, num,
                                    pval, table)
from moegrad.study.metrics import (BASELINE, FIELDS, TESTED, aggregate, by_tau, effect_vs_baseline,
                                   finetune_stats, flops_budget, loss_at_flops, loss_at_time,
                                   run_values, steps_to, time_limited)
from moegrad.study.stats import ALPHA, MIN_PAIRED
from moegrad.study.summary import summary_entry, write_grid_summary

#: what this module defined before it was split; the names stay importable from here
__all__ = ["FIELDS", "TESTED", "BASELINE", "DAGGER", "time_limited", "loss_at_time",
           "loss_at_flops", "steps_to", "flops_budget", "run_values", "finetune_stats",
           "aggregate", "fmt", "fmt_ci", "num", "pval", "verdict", "verdict_groups", "verdicts",
           "observations", "fidelity_sentences", "conclusions", "settings_lines", "write_report",
           "fidelity_table", "effect_vs_baseline", "summary_entry", "write_grid_summary"]


_SETTING_NAMES = {"task": "task", "regime": "regime", "top_k": "experts per token (top-k)",
                  "num_experts": "experts per MoE layer", "losses": "balance losses",
                  "router_init": "router initialisation", "lr": "learning rate (Adam)",
                  "num_classes": "clusters", "dim": "model dimension", "layers": "layers",
                  "routing": "routing (selection method)"}


def settings_lines(doc: dict) -> list[str]:
    """The cell's settings as a table, and the budget (seeds, steps, time)."""
    s = doc.get("settings")
    a = doc["args"]
    lines = ["## Settings", ""]
    if s:
        lines += ["| setting | value |", "|---|---|"]
        for k, v in s.items():
            lines.append(f"| {_SETTING_NAMES.get(k, k)} | "
                         f"{losses_text(v) if k == 'losses' else v} |")
        lines.append("")
    else:
        lines += ["The runs did not record their settings (older moegrad study).", ""]
    lines.append(f"Task config: `{json.dumps(doc.get('task_config', {}))}`.")
    seeds = a.get("seeds")
    quick = " (`--quick`)" if a.get("quick") else ""
    lines += ["", f"Budget per run{quick}: {a.get('steps')} steps or {a.get('time_budget')} s of "
              f"training time, whichever comes first; {seeds} seeds (0..{(seeds or 1) - 1}), the "
              f"same seed giving every estimator the same data and initial weights; balance "
              f"losses {losses_text(a.get('losses'))}. Wall-clock figures are machine-dependent.",
              ""]
    return lines


def _names(doc: dict) -> list[str]:
    return list(doc["estimators"])


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
        row = [f"`{name}`{flag(per, name)}", str(count(m["final_loss"])), fmt(m["final_loss"], 4),
               fmt_ci(m["final_loss"], 4)]
        if has_bpc:
            row += [fmt(m["bits_per_char"]), fmt_ci(m["bits_per_char"])]
        if has_purity:
            k, n = purity_count(doc, name, lambda v: v >= 0.9)
            row += [fmt(m["purity"], 2), fmt_ci(m["purity"], 2), f"{k} of {n}"]
        row += [fmt(m["steps"], 0), str(len(m.get("time_limited_seeds") or []))]
        rows.append(row)
    lines += table(head, rows) + dagger_note(per)

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
        rows = [[f"`{n}`{flag(per, n)}", fmt(per[n]["loss_before"], 4),
                 fmt(per[n]["final_loss"], 4), fmt(per[n]["drift_topk_overlap"], 3),
                 fmt(per[n]["drift_js"], 4), fmt(per[n]["experts_revived"], 1),
                 fmt(per[n]["experts_killed"], 1)] for n in names]
        lines += table(head, rows) + dagger_note(per)

    lines += ["", "## Routing health", "",
              "At the end of training, over the last window of steps; mean ± sample sd over "
              "seeds.", ""]
    head = ["estimator", "dead experts", "load coefficient of variation", "max load violation",
            "router entropy", "active experts per token"]
    rows = [[f"`{n}`{flag(per, n)}", fmt(per[n]["dead_experts"], 1), fmt(per[n]["load_cv"], 2),
             fmt(per[n]["max_violation"], 2), fmt(per[n]["entropy"], 2),
             fmt(per[n].get("active_experts"), 2)] for n in names]
    lines += table(head, rows) + dagger_note(per)
    lines += ["", "*dead experts*: experts without a token over the last window; *load "
              "coefficient of variation*: sd / mean of the per-expert share of tokens; *max load "
              "violation*: max load / mean load - 1; *router entropy*: entropy of the router's "
              "scores, normalised (1 = uniform); *active experts per token*: mean number of experts "
              "a token was dispatched to (K under token choice; under expert_choice and remoe "
              "the chosen pairs per token, 0..E). Under expert_choice and remoe, loads count the "
              "chosen pairs and purity reads each token's highest-score chosen expert, a token "
              "no expert took counting as impure."]

    lines += ["", "## Compute", ""]
    head = ["estimator"]
    if has_flops:
        head += ["FLOPs per step", f"loss at equal FLOPs ({doc['flops_budget']:.3g})", "95% CI"]
    head += [f"steps to loss {doc['target_loss']:.3f}", "ms per step (this machine)",
             f"loss at equal wall time ({doc['equal_time_seconds']:.1f} s, this machine)"]
    rows = []
    for n in names:
        m = per[n]
        row = [f"`{n}`{flag(per, n)}"]
        if has_flops:
            fps = m["flops_per_step"]["mean"]
            row += [f"{fps:.3g}" if fps is not None else "n/a", fmt(m["loss_at_equal_flops"], 4),
                    fmt_ci(m["loss_at_equal_flops"], 4)]
        row += [fmt(m["steps_to_target"], 0), fmt(m["ms_per_step"], 1),
                fmt(m["loss_at_equal_time"], 4)]
        rows.append(row)
    lines += table(head, rows) + dagger_note(per)
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
            rows.append([TESTED.get(c["metric"], c["metric"]), f"`{c['a']}`{flag(per, c['a'])}",
                         f"`{c['b']}`{flag(per, c['b'])}", str(c["n"]), num(c["mean_diff"]),
                         f"[{num(ci[0])}, {num(ci[1])}]" if ci else "n/a",
                         f"{c['t']:.2f}" if c.get("t") is not None else "n/a",
                         pval(c.get("p")).replace("p = ", "").replace("p ", ""),
                         pval(c.get("p_holm")).replace("p = ", "").replace("p ", ""), result])
        lines += table(head, rows) + dagger_note(per)

    fid = doc.get("fidelity")
    for what, why in (doc.get("not_applicable") or {}).items():
        lines += ["", f"## Router-gradient fidelity: {why}" if what == "diagnostics" else
                  f"## {what}: {why}"]
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
            rows.append([f"`{n}`{flag(per, n)}", fmt(m.get("cos_exact_initial"), 2),
                         fmt(m["cos_exact_sample"], 2), fmt(m["cos_exact"], 2),
                         fmt(m["cos_dense"], 2), fmt(m["grad_variance"], 2),
                         m.get("reference") or "n/a", z])
        lines += table(head, rows) + dagger_note(per)
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
            v = by_tau(e.get("step0", {}), t)
            row.append(f"{v:.2f}" if v is not None else "n/a")
        for t in taus:
            v = by_tau(e.get("mean_after_step0", {}), t)
            row.append(f"{v:.2f}" if v is not None else "n/a")
        z = e.get("zero_gradient_at") or []
        row.append(f"{len(z)} of {len(cks)}" + (f" ({', '.join(str(x) for x in z)})" if z else ""))
        rows.append(row)
    return table(head, rows) + [
        "", "*cos exact*: cosine of the estimator's router gradient to the exact gradient of the "
        "expected loss of top-k sampled from softmax(z / tau), every subset enumerated, measured "
        "for every estimator on the same checkpoints (labels: "
        + ", ".join(f"{c.get('label')} = step {c.get('step')}" for c in cks) + ")."]
