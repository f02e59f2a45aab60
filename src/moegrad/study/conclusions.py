"""The sentences of a study report: verdicts, each decided by a paired t-test across seeds
(Holm-corrected, :mod:`moegrad.study.stats`), never by means alone, then descriptive observations
(seeds, time-limited runs, purity, zero router gradients, gradient fidelity) that rank nothing.
"""

from __future__ import annotations

from typing import Optional

from moegrad.study.markdown import DAGGER, count, num, pval
from moegrad.study.metrics import BASELINE, TESTED, by_tau
from moegrad.study.stats import MIN_PAIRED, clean


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


def purity_count(doc: dict, name: str, test) -> tuple[int, int]:
    vals = clean(doc["estimators"][name].get("purity", {}).get("values", []))
    return sum(1 for v in vals if test(v)), len(vals)


def observations(doc: dict) -> list[str]:
    """Descriptive facts (no ranking): seeds, time-limited runs, machine-dependent timing,
    purity per seed, zero router gradients, what the gradient cosines were measured on."""
    per = doc["estimators"]
    a = doc["args"]
    out = []
    seeds = a.get("seeds") or max((count(per[n]["final_loss"]) for n in per), default=0)
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
            k, m = purity_count(doc, n, lambda v: v >= 0.9)
            if m:
                good.append(f"`{n}` {k} of {m}")
            k, m = purity_count(doc, n, lambda v: v <= chance + 0.1)
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
            vals = {n: by_tau(e.get("mean_after_step0", {}), tau) for n, e in est.items()}
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
