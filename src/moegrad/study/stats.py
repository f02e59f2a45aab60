"""Statistics of a study: sample sd, t-based 95% confidence intervals, paired t-tests, Holm.

Seeds are the unit of replication: a study trains every estimator once per seed, and the same
seed gives every estimator the same data and initial weights, so two estimators are compared
by a *paired* t-test on the per-seed differences d_i = a_i - b_i (i = 1..n):

    d̄ = mean(d),  s = sqrt(sum (d_i - d̄)^2 / (n - 1)),  se = s / sqrt(n),
    t = d̄ / se,  p = 2 P(T_{n-1} > |t|),  95% CI = d̄ ± t_{0.975, n-1} se

(Student 1908; any textbook, e.g. Wasserman, *All of Statistics*, 10.7). The many pairs of one
metric are corrected together with Holm's step-down method (Holm 1979, "A simple sequentially
rejective multiple test procedure", Scand. J. Statist. 6): with the m p-values sorted
p_(1) <= ... <= p_(m), the adjusted p_(j) = max_{i <= j} min(1, (m - i + 1) p_(i)); a pair is
significant when its adjusted p < 0.05. This controls the family-wise error rate without
assuming independence between the pairs.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

try:
    from scipy import stats as _sps
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("moegrad.study.stats needs scipy: pip install 'moegrad[study]'") from exc

#: significance level of every test and confidence level 1 - ALPHA of every interval
ALPHA = 0.05
#: fewest paired seeds for which the study runs a test (with 2 seeds the t quantile is 12.7:
#: any interval is so wide that the study gives means only and says so)
MIN_PAIRED = 3


def clean(values: Iterable) -> list[float]:
    """The finite numbers of ``values`` (None and NaN dropped: a metric a run did not have)."""
    out = []
    for v in values:
        if v is None or isinstance(v, bool):
            continue
        v = float(v)
        if math.isfinite(v):
            out.append(v)
    return out


def sample_sd(values: Sequence[float]) -> Optional[float]:
    """Sample standard deviation sqrt(sum (x - x̄)^2 / (n - 1)); None for n < 2."""
    xs = clean(values)
    n = len(xs)
    if n < 2:
        return None
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def t_quantile(q: float, df: int) -> float:
    """Quantile q of Student's t with ``df`` degrees of freedom (t_{0.975, 4} = 2.776)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q={q} must be in (0, 1)")
    if df < 1:
        raise ValueError(f"df={df} must be >= 1")
    return float(_sps.t.ppf(q, df))


def ci95(values: Sequence[float]) -> Optional[list[float]]:
    """t-based 95% confidence interval of the mean, [x̄ - t se, x̄ + t se] with se = s / sqrt(n)
    and t = t_{0.975, n-1}; None for n < 2."""
    xs = clean(values)
    n = len(xs)
    if n < 2:
        return None
    m = sum(xs) / n
    half = t_quantile(1 - ALPHA / 2, n - 1) * sample_sd(xs) / math.sqrt(n)
    return [m - half, m + half]


def describe(values: Sequence) -> dict:
    """values (one per seed, None where a run has no value) -> {"mean", "sd", "std", "ci95",
    "n", "values"}: ``sd`` the sample sd (None for n < 2), ``std`` an alias of ``sd`` kept for
    readers of older metrics.json files, ``n`` the number of finite values."""
    xs = clean(values)
    n = len(xs)
    sd = sample_sd(xs)
    return {"mean": sum(xs) / n if n else None, "sd": sd, "std": sd, "ci95": ci95(xs), "n": n,
            "values": list(values)}


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired t-test of a against b (a[i] and b[i] from the same seed).

    Returns {"n", "mean_diff" (mean of a - b), "sd_diff", "ci95" (of the mean difference),
    "t", "p" (two-sided)}. Pairs where either value is missing are dropped. n < 2: t, p, ci95
    None. Every difference equal (sd 0): p = 1 if they are all 0 (the two are identical), else
    p = 0 (a constant shift); t is None (infinite or undefined) and ci95 the point.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got len(a)={len(a)}, len(b)={len(b)}")
    d = [x - y for x, y in zip(a, b) if clean([x]) and clean([y])]
    n = len(d)
    out = {"n": n, "mean_diff": sum(d) / n if n else None, "sd_diff": None, "ci95": None,
           "t": None, "p": None}
    if n < 2:
        return out
    m = out["mean_diff"]
    s = sample_sd(d)
    out["sd_diff"] = s
    if s == 0.0:
        out["ci95"] = [m, m]
        out["p"] = 1.0 if m == 0.0 else 0.0
        return out
    se = s / math.sqrt(n)
    t = m / se
    half = t_quantile(1 - ALPHA / 2, n - 1) * se
    out.update(ci95=[m - half, m + half], t=t, p=float(2 * _sps.t.sf(abs(t), n - 1)))
    return out


def holm(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm-adjusted p-values, in the order given; None entries (no test) stay None and do not
    count in m. Sorted ascending, adjusted p_(j) = max_{i<=j} min(1, (m - i + 1) p_(i))."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    out: list[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def compare_pairs(per_seed: dict, metric: str, order: Sequence[str],
                  baseline: Optional[str] = "topk") -> list[dict]:
    """Paired tests between every two estimators on one metric, Holm-corrected together.

    per_seed: {estimator: {seed: value or None}}; order: the estimators in report order.
    A pair with the baseline has it as ``b`` (mean_diff = a - baseline); other pairs follow
    ``order``. Each entry: {"metric", "a", "b", "n", "mean_diff", "ci95", "t", "p", "p_holm",
    "significant", "tested", "identical"}; ``tested`` is False with fewer than MIN_PAIRED
    paired seeds (then t, p, p_holm and ci95 are None: means only, no verdict).
    """
    names = [n for n in order if n in per_seed]
    pairs = []
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            pairs.append((y, x) if x == baseline else (x, y))
    if baseline in names:  # baseline pairs first, in report order
        pairs.sort(key=lambda ab: ab[1] != baseline)
    out = []
    for a, b in pairs:
        seeds = [s for s in per_seed[a] if s in per_seed[b]]
        test = paired_t_test([per_seed[a][s] for s in seeds], [per_seed[b][s] for s in seeds])
        tested = test["n"] >= MIN_PAIRED
        out.append({"metric": metric, "a": a, "b": b, "n": test["n"],
                    "mean_diff": test["mean_diff"], "ci95": test["ci95"] if tested else None,
                    "t": test["t"] if tested else None, "p": test["p"] if tested else None,
                    "p_holm": None, "significant": False, "tested": tested,
                    "identical": bool(test["n"] >= 1 and test["sd_diff"] in (0.0, None)
                                      and test["mean_diff"] == 0.0)})
    for entry, adj in zip(out, holm([e["p"] for e in out])):
        entry["p_holm"] = adj
        entry["significant"] = adj is not None and adj < ALPHA
    return out
