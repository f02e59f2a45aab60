"""PNG plots of a study (matplotlib, Agg backend: no display needed).

Every curve gets its own colour, dash pattern and marker, with markers staggered along the
curve (``markevery`` offsets), so curves that coincide stay visible; curves identical in every
seed are named in the legend ("= topk") and in ``doc["plot_notes"]`` (printed by the report).
Every plot has labelled axes and a legend.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from moegrad.study.metrics import (BASELINE, TESTED, by_tau, effect_vs_baseline,  # noqa: E402
                                   grid_metrics, grid_names)

_DASHES = ("-", (0, (6, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)), (0, (3, 1, 1, 1, 1, 1)),
           (0, (10, 3)), (0, (2, 3)), (0, (6, 2, 1, 2, 1, 2)))
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


def style(i: int) -> dict:
    """The i-th curve's colour, dash pattern and marker (all three vary together)."""
    return {"color": plt.get_cmap("tab10")(i % 10), "ls": _DASHES[i % len(_DASHES)],
            "marker": _MARKERS[i % len(_MARKERS)]}


def _by_estimator(runs: list[dict]) -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault(r["estimator"], []).append(r)
    return out


def identical_groups(runs: list[dict], ykey: str) -> list[list[str]]:
    """Estimators whose ``history[ykey]`` is identical (to 1e-12 relative) in every seed they
    share, grouped in first-seen order; groups of one are left out."""
    series = {name: {r["seed"]: r["history"].get(ykey) or [] for r in mine}
              for name, mine in _by_estimator(runs).items()}

    def same(a: dict, b: dict) -> bool:
        if set(a) != set(b):
            return False
        for s in a:
            x, y = a[s], b[s]
            if len(x) != len(y) or not x:
                return False
            for u, v in zip(x, y):
                if (u is None) != (v is None):
                    return False
                if u is not None and abs(u - v) > 1e-12 * max(1.0, abs(u), abs(v)):
                    return False
        return True

    groups: list[list[str]] = []
    for name in series:
        for g in groups:
            if same(series[g[0]], series[name]):
                g.append(name)
                break
        else:
            groups.append([name])
    return [g for g in groups if len(g) > 1]


def _mean_band(mine: list[dict], xkey: str, ykey: str):
    """Seeds of one estimator -> (x mean, y mean, y min, y max), over the evaluations every seed
    reached (a run stopped by the clock has fewer); points without a value are skipped."""
    series = []
    for r in mine:
        h = r["history"]
        series.append([(x, y) for x, y in zip(h.get(xkey) or [], h.get(ykey) or [])
                       if y is not None and x is not None])
    n = min(len(s) for s in series)
    if n == 0:
        return (), (), (), ()
    xs = np.array([[p[0] for p in s[:n]] for s in series], dtype=float)
    ys = np.array([[p[1] for p in s[:n]] for s in series], dtype=float)
    return xs.mean(0), ys.mean(0), ys.min(0), ys.max(0)


def _curves(ax, runs: list[dict], xkey: str, ykey: str, xlabel: str, ylabel: str,
            log=False) -> list[str]:
    """One line per estimator (mean over seeds) with a band from the best to the worst seed;
    returns the legend labels. Estimators identical in every seed are labelled "(= other)"."""
    same_as = {}
    for g in identical_groups(runs, ykey):
        for name in g[1:]:
            same_as[name] = g[0]
    labels = []
    groups = sorted(_by_estimator(runs).items())
    for i, (name, mine) in enumerate(groups):
        xs, mean, low, high = _mean_band(mine, xkey, ykey)
        if len(xs) == 0:
            continue
        st = style(i)
        every = max(1, len(xs) // 6)
        label = name + (f" (= {same_as[name]}, identical)" if name in same_as else "")
        limited = sum(1 for r in mine if r.get("time_limited", r.get("stopped_by") == "time"))
        if limited:
            label += f" † {limited} run(s) stopped by time"
        ax.plot(xs, mean, color=st["color"], ls=st["ls"], marker=st["marker"], ms=5,
                markevery=(i % every, every), mfc="none" if i % 2 else st["color"], lw=1.6,
                label=label)
        labels.append(label)
        if len(mine) > 1:
            ax.fill_between(xs, low, high, color=st["color"], alpha=0.10, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return labels


def _notes(runs: list[dict], ykey: str, what: str) -> list[str]:
    return [", ".join(f"`{n}`" for n in g) + f": identical {what} in every seed (the curves "
            "lie on top of each other; staggered markers show each one)"
            for g in identical_groups(runs, ykey)]


def write_plots(runs: list[dict], doc: dict, out: Path) -> list[str]:
    """Write the study's PNGs into ``out``; return their file names. Sets ``doc["plot_notes"]``
    (identical curves) for the report."""
    out = Path(out)
    written = []
    notes = _notes(runs, "val_loss", "validation loss curves")

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    axes_x = [("eval_step", "loss_vs_step.png", "training step"),
              ("eval_time", "loss_vs_time.png", "training time (s, this machine)")]
    if runs and all(r["history"].get("flops") for r in runs):
        axes_x.append(("flops", "loss_vs_flops.png", "training FLOPs (cumulative)"))
    for xkey, name, label in axes_x:
        fig, ax = plt.subplots(figsize=(8, 4))
        _curves(ax, runs, xkey, "val_loss", label, "validation loss (log scale)", log=True)
        ax.set_title(f"{doc['task']}: validation loss (mean over seeds, band: min-max)", fontsize=10)
        save(fig, name)

    groups = sorted(_by_estimator(runs).items())
    cols = 4
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.6), squeeze=False)
    experts = 0
    for ax, (name, mine) in zip(axes.flat, groups):
        h = mine[0]["history"]
        loads = [row for row in h["load"] if row]
        if loads:
            experts = max(experts, len(loads[0]))
            ax.stackplot(h["eval_step"][:len(loads)], np.array(loads).T,
                         labels=[f"expert {e}" for e in range(len(loads[0]))],
                         colors=[plt.get_cmap("tab10" if len(loads[0]) <= 10 else "tab20")(e % 20)
                                 for e in range(len(loads[0]))])
        ax.set_title(f"{name} (seed {mine[0]['seed']})", fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("training step", fontsize=7)
        ax.set_ylabel("share of tokens", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    if experts:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(experts, 8), fontsize=7,
                   frameon=False)
    fig.suptitle("load per expert (share of routed tokens, stacked) vs step, first MoE layer",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out / "load.png", dpi=110)
    plt.close(fig)
    written.append("load.png")

    per = doc["estimators"]
    names = [n for n in per if per[n]["cos_exact"]["mean"] is not None]
    if names:
        fig, ax = plt.subplots(figsize=(9, 4))
        xs = np.arange(len(names))
        r = doc["args"].get("diag_samples")
        bars = (("cos_exact_sample", "vs exact, one sample"),
                ("cos_exact", f"vs exact, mean of {r} samples"),
                ("cos_dense", "vs dense mixture"))
        width = 0.8 / (len(bars) + 1)
        for j, (key, label) in enumerate(bars):
            off = (j - len(bars) / 2) * width
            means = [per[n][key]["mean"] if per[n][key]["mean"] is not None else np.nan
                     for n in names]
            err = [_halfwidth(per[n][key]) for n in names]
            ax.bar(xs + off, means, width=width, yerr=err, label=label + " (after step 0)",
                   capsize=2, hatch=("", "//", "..")[j], edgecolor="k", lw=0.5)
        init = [per[n].get("cos_exact_initial", {}).get("mean") for n in names]
        ax.bar(xs + (len(bars) / 2) * width, [np.nan if v is None else v for v in init],
               width=width, color="0.8", edgecolor="k", lw=0.5, hatch="xx",
               label="vs exact, step 0 (initialisation)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("estimator")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("cosine (mean over diagnostics)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_title("router-gradient fidelity on each estimator's own trajectory "
                     "(error bars: 95% CI over seeds)", fontsize=9)
        save(fig, "grad_cosine.png")

    fid = doc.get("fidelity")
    if fid and fid.get("estimators"):
        fig, ax = plt.subplots(figsize=(9, 4))
        est = list(fid["estimators"])
        xs = np.arange(len(est))
        taus = fid.get("taus", [])
        for j, tau in enumerate(taus):
            st = style(j)
            ys = [by_tau(fid["estimators"][n].get("mean_after_step0", {}), tau) for n in est]
            y0 = [by_tau(fid["estimators"][n].get("step0", {}), tau) for n in est]
            off = (j - (len(taus) - 1) / 2) * 0.15
            ax.plot(xs + off, [np.nan if v is None else v for v in ys], ls="none",
                    marker=st["marker"], color=st["color"], ms=7,
                    label=f"tau = {tau}: mean after step 0")
            ax.plot(xs + off, [np.nan if v is None else v for v in y0], ls="none",
                    marker=st["marker"], color=st["color"], mfc="none", ms=7,
                    label=f"tau = {tau}: step 0")
        ax.set_xticks(list(xs))
        ncks = len(fid.get("checkpoints", []))
        ticks = [n + (f"\n(zero gradient on {len(z)} of {ncks})"
                      if (z := fid["estimators"][n].get("zero_gradient_at")) else "") for n in est]
        ax.set_xticklabels(ticks, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("estimator")
        ax.set_ylabel("cosine to the exact gradient")
        ax.axhline(0, color="k", lw=0.8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_title("router-gradient fidelity on shared checkpoints", fontsize=10)
        save(fig, "fidelity.png")

    if doc.get("chance_purity") is not None:
        fig, ax = plt.subplots(figsize=(8, 4))
        _curves(ax, runs, "eval_step", "purity", "training step", "routing purity")
        ax.axhline(doc["chance_purity"], color="k", lw=0.8, label="chance")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_ylim(0, 1.02)
        ax.set_title("routing purity, mean over seeds (band: min-max; black line: chance)",
                     fontsize=10)
        save(fig, "purity.png")
        notes += _notes(runs, "purity", "purity curves")
    doc["plot_notes"] = notes
    return written


def _halfwidth(stat: dict) -> float:
    ci = stat.get("ci95")
    if not ci or stat.get("mean") is None:
        return 0.0
    return (ci[1] - ci[0]) / 2


def write_summary_plot(docs: list[dict], path: Path) -> None:
    """Effect size vs ``topk`` per estimator and cell (one panel per tested metric): the mean
    paired difference with its 95% CI; filled markers significant after Holm, hollow markers
    not distinguishable, crosses too few seeds for a test."""
    metrics = grid_metrics(docs) or ["final_loss"]
    names = grid_names(docs)
    cells = [d.get("cell", f"cell {i}") for i, d in enumerate(docs)]
    panel = max(4.5, 0.8 * len(names) + 2.5)
    fig, axes = plt.subplots(1, len(metrics), figsize=(panel * len(metrics) + 2.5, 4.5),
                             squeeze=False)
    width = 0.7
    for ax, metric in zip(axes.flat, metrics):
        for j, d in enumerate(docs):
            st = style(j)
            off = (j - (len(docs) - 1) / 2) * width / max(1, len(docs))
            for k, n in enumerate(names):
                c = effect_vs_baseline(d, n, metric) if BASELINE in d["estimators"] else None
                if c is None or c["mean_diff"] is None:
                    continue
                x, y = k + off, c["mean_diff"]
                tested = c.get("tested", c.get("p") is not None)
                if tested and c.get("ci95"):
                    lo, hi = c["ci95"]
                    ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], color=st["color"], lw=1,
                                capsize=2, ls="none")
                if not tested:
                    ax.plot([x], [y], marker="x", color=st["color"], ls="none", ms=7)
                else:
                    ax.plot([x], [y], marker=st["marker"], color=st["color"], ls="none", ms=7,
                            mfc=st["color"] if c["significant"] else "white")
                    if c["significant"]:
                        top = c["ci95"][1] if c.get("ci95") else y
                        ax.annotate("*", (x, top), xytext=(0, 2), textcoords="offset points",
                                    ha="center", va="bottom", color=st["color"], fontsize=11)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("estimator")
        ax.set_ylabel(f"{TESTED[metric]}: estimator - topk")
        ax.set_title(f"{TESTED[metric]} vs topk (95% CI)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    handles = [Line2D([], [], color=style(j)["color"], marker=style(j)["marker"], ls="none",
                      label=f"cell {c}") for j, c in enumerate(cells)]
    handles += [Line2D([], [], color="k", marker="o", ls="none", label="filled, *: significant "
                       "after Holm (p < 0.05)"),
                Line2D([], [], color="k", marker="o", mfc="white", ls="none",
                       label="hollow: not distinguishable"),
                Line2D([], [], color="k", marker="x", ls="none", label="x: too few seeds, no test")]
    axes.flat[-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                         frameon=False)
    fig.suptitle("effect size vs topk per estimator and cell (paired over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
