"""The summary of a grid of study cells: ``summary.md`` (per tested metric, each estimator's
difference from ``topk`` in every cell, with its 95% CI and test result) and ``summary.png``
(:func:`moegrad.study.plots.write_summary_plot`)."""

from __future__ import annotations

from pathlib import Path

from moegrad.study.markdown import DAGGER, fmt, losses_text, num, table
from moegrad.study.metrics import BASELINE, TESTED, effect_vs_baseline, grid_metrics, grid_names
from moegrad.study.plots import write_summary_plot
from moegrad.study.stats import ALPHA, MIN_PAIRED


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


def _cell_settings(doc: dict) -> str:
    s = doc.get("settings")
    if not s:
        return f"task {doc.get('task')} (settings not recorded)"
    return ", ".join(f"{k}={losses_text(v) if k == 'losses' else v}" for k, v in s.items())


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
    names = grid_names(docs)
    lines = ["# moegrad study: grid summary", "", f"Reproduce: `{command}`", "",
             "## Cells", ""]
    rows = []
    for cell, d in zip(cells, docs):
        seeds = d.get("args", {}).get("seeds")
        limited = len(d.get("time_limited_runs") or [])
        rows.append([f"`{cell}`", _cell_settings(d), str(seeds), str(d.get("args", {}).get("steps")),
                     str(limited)])
    lines += table(["cell", "settings", "seeds", "steps", "runs stopped by time"], rows)
    lines += ["", "Entries: mean difference estimator - `topk` over seeds [uncorrected 95% CI "
              "of the paired difference]; `*` significant (paired t-test, p < "
              f"{ALPHA} after Holm correction within the cell and metric), `n.s.` not "
              f"distinguishable; `no test` fewer than {MIN_PAIRED} paired seeds (means only); "
              f"{DAGGER} some runs of the estimator or of `topk` stopped by the time budget. "
              "Negative loss differences and positive purity differences favour the estimator.",
              ""]
    for metric in grid_metrics(docs):
        lines += [f"## {TESTED[metric]} vs `topk`", ""]
        rows = [[f"`{n}`"] + [summary_entry(d, n, metric) for d in docs] for n in names]
        base = ["`topk` (mean ± sd)"]
        for d in docs:
            st = d["estimators"].get(BASELINE, {}).get(metric)
            base.append(fmt(st, 4) if st else "not run")
        lines += table(["estimator"] + [f"`{c}`" for c in cells], rows + [base]) + [""]
    if not grid_metrics(docs):
        lines += ["No paired comparisons in these documents.", ""]
    lines += ["![effect sizes vs topk](summary.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))
    write_summary_plot(docs, out / "summary.png")
