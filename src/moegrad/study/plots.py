"""PNG plots of a study (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _by_estimator(runs: list[dict]) -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault(r["estimator"], []).append(r)
    return out


_STYLES = ("-", "--", ":", "-.")


def _mean_band(mine: list[dict], xkey: str, ykey: str):
    """Seeds of one estimator -> (x mean, y mean, y min, y max), over the evaluations every seed
    reached (a run stopped by the clock has fewer); points without a value are skipped."""
    import numpy as np

    series = []
    for r in mine:
        h = r["history"]
        series.append([(x, y) for x, y in zip(h[xkey], h[ykey]) if y is not None])
    n = min(len(s) for s in series)
    if n == 0:
        return (), (), (), ()
    xs = np.array([[p[0] for p in s[:n]] for s in series], dtype=float)
    ys = np.array([[p[1] for p in s[:n]] for s in series], dtype=float)
    return xs.mean(0), ys.mean(0), ys.min(0), ys.max(0)


def _curves(ax, runs: list[dict], xkey: str, ykey: str, xlabel: str, ylabel: str, log=False) -> None:
    """One line per estimator (mean over seeds) with a band from the best to the worst seed.
    Colours and dash styles both vary, so estimators whose curves coincide stay visible."""
    cmap = plt.get_cmap("tab10")
    for i, (name, mine) in enumerate(sorted(_by_estimator(runs).items())):
        xs, mean, low, high = _mean_band(mine, xkey, ykey)
        color = cmap(i % 10)
        ax.plot(xs, mean, color=color, ls=_STYLES[i % len(_STYLES)], lw=1.6, label=name)
        if len(mine) > 1:
            ax.fill_between(xs, low, high, color=color, alpha=0.12, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def write_plots(runs: list[dict], doc: dict, out: Path) -> list[str]:
    """Write the study's PNGs into ``out``; return their file names."""
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    for xkey, name, label in (("eval_step", "loss_vs_step.png", "step"),
                              ("eval_time", "loss_vs_time.png", "training time (s)")):
        fig, ax = plt.subplots(figsize=(7.5, 4))
        _curves(ax, runs, xkey, "val_loss", label, "validation loss", log=True)
        ax.set_title(f"{doc['task']}: validation loss (mean over seeds, band: min-max)")
        save(fig, name)

    groups = sorted(_by_estimator(runs).items())
    cols = 4
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (name, mine) in zip(axes.flat, groups):
        h = mine[0]["history"]
        loads = [row for row in h["load"] if row]
        if loads:
            import numpy as np

            ax.stackplot(h["eval_step"][:len(loads)], np.array(loads).T)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle("load per expert (fraction of tokens, stacked) vs step", fontsize=10)
    save(fig, "load.png")

    per = doc["estimators"]
    names = [n for n in sorted(per) if per[n]["cos_exact"]["mean"] is not None]
    if names:
        fig, ax = plt.subplots(figsize=(9, 3.8))
        xs = range(len(names))
        r = doc["args"].get("diag_samples")
        bars = (("cos_exact_sample", "vs exact gradient, per sample (one training step)"),
                ("cos_exact", f"vs exact gradient, mean of {r} samples"),
                ("cos_dense", "vs dense-mixture gradient"))
        width = 0.8 / len(bars)
        for j, (key, label) in enumerate(bars):
            off = (j - (len(bars) - 1) / 2) * width
            ax.bar([x + off for x in xs], [per[n][key]["mean"] for n in names], width=width,
                   yerr=[per[n][key]["std"] for n in names], label=label, capsize=2)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("cosine (mean over training)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_title("router-gradient fidelity (exact: each estimator's own forward weights)")
        save(fig, "grad_cosine.png")

    if doc.get("chance_purity") is not None:
        fig, ax = plt.subplots(figsize=(7.5, 4))
        _curves(ax, runs, "eval_step", "purity", "step", "purity")
        ax.axhline(doc["chance_purity"], color="k", lw=0.8)
        ax.set_ylim(0, 1.02)
        ax.set_title("routing purity, mean over seeds (black line: chance)")
        save(fig, "purity.png")
    return written
