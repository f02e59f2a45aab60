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


def _curves(ax, runs: list[dict], xkey: str, ykey: str, xlabel: str, ylabel: str, log=False) -> None:
    cmap = plt.get_cmap("tab10")
    for i, (name, mine) in enumerate(sorted(_by_estimator(runs).items())):
        for j, r in enumerate(mine):
            h = r["history"]
            xs, ys = zip(*[(x, y) for x, y in zip(h[xkey], h[ykey]) if y is not None]) if any(
                y is not None for y in h[ykey]) else ((), ())
            ax.plot(xs, ys, color=cmap(i % 10), alpha=0.85, lw=1.3, label=name if j == 0 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


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
        fig, ax = plt.subplots(figsize=(6.5, 4))
        _curves(ax, runs, xkey, "val_loss", label, "validation loss", log=True)
        ax.set_title(f"{doc['task']}: validation loss (each line one seed)")
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
        fig, ax = plt.subplots(figsize=(7, 3.6))
        xs = range(len(names))
        for off, key, label in ((-0.2, "cos_exact", "vs exact expected-loss gradient"),
                                (0.2, "cos_dense", "vs dense-mixture gradient")):
            ax.bar([x + off for x in xs], [per[n][key]["mean"] for n in names], width=0.4,
                   yerr=[per[n][key]["std"] for n in names], label=label, capsize=2)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("cosine (mean over training)")
        ax.legend(fontsize=7)
        ax.set_title("router-gradient fidelity")
        save(fig, "grad_cosine.png")

    if doc.get("chance_purity") is not None:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        _curves(ax, runs, "eval_step", "purity", "step", "purity")
        ax.axhline(doc["chance_purity"], color="k", ls="--", lw=0.8)
        ax.set_ylim(0, 1.02)
        ax.set_title("routing purity (dashed: chance)")
        save(fig, "purity.png")
    return written
