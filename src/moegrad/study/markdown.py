"""How report.md and summary.md write numbers and tables: "mean ± sd", intervals, differences,
p-values, markdown tables, and the dagger that marks runs stopped by the time budget."""

from __future__ import annotations

from typing import Optional

from moegrad.study.stats import clean

DAGGER = "†"


def count(stat: dict) -> int:
    return stat.get("n", len(clean(stat.get("values", []))))


def _sd(stat: dict):
    return stat.get("sd", stat.get("std"))


def fmt(stat: dict, digits: int = 3) -> str:
    """"mean ± sample sd" (the mean alone for one value, n/a for none)."""
    if stat is None or stat.get("mean") is None:
        return "n/a"
    if _sd(stat) is None or count(stat) < 2:
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


def flag(per: dict, name: str) -> str:
    return f" {DAGGER}" if per.get(name, {}).get("time_limited_seeds") else ""


def dagger_note(per: dict) -> list[str]:
    if any(per[n].get("time_limited_seeds") for n in per):
        return ["", f"{DAGGER} some runs of this estimator were stopped by the time budget "
                    "before their step budget (fewer steps; see the observations)."]
    return []


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def losses_text(losses) -> str:
    if not losses:
        return "none"
    if isinstance(losses, dict):
        return ", ".join(f"{k}={v}" for k, v in losses.items())
    return str(losses)
