"""One training run: a task, an estimator, a seed, a step budget and a wall-clock budget.

Every run uses Adam at the task's learning rate and stops at ``steps`` steps or when its
training time (evaluation and diagnostics excluded) passes ``time_budget`` seconds, whichever
comes first. Every ``eval_every`` steps it records the validation metrics, the routing health
of the first MoE layer over the last window, and, every ``diag_every`` steps on tasks with a
probe, the estimator's gradient fidelity (:mod:`moegrad.diagnostics`): ``cos_exact`` is the
cosine of the mean of ``diag_samples`` sampled gradients to the exact gradient,
``cos_exact_sample`` the mean cosine of single samples (what one training step uses; equal to
``cos_exact`` for deterministic estimators), and ``reference`` names the forward weight rule of
the exact reference the estimator was compared with.
"""

from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

from moegrad import estimators as registry
from moegrad.diagnostics import (LoadWindow, gradient_fidelity, load_cv, max_violation,
                                 router_entropy)


def train_run(task, estimator: str, seed: int, *, steps: int, time_budget: float,
              eval_every: int, diag_every: int, diag_samples: int = 8, tau: float = 1.0,
              losses: Optional[dict] = None, options: Optional[dict] = None,
              window: int = 50, on_step=None) -> dict:
    """Train one model; return its history and final metrics (a JSON-ready dict).

    ``ms_per_step`` is the median step time (robust to other processes stealing the CPU for a
    while); ``ms_per_step_mean`` is train_time / steps.

    ``on_step()`` is called after every optimiser step (the progress bar).
    """
    losses = {} if losses is None else losses
    options = dict(options or {})
    cls = registry.get(estimator)
    if cls.samples and "generator" in cls.options:
        options.setdefault("generator", torch.Generator().manual_seed(50_000 + seed))
    model = task.build(estimator, options, losses, seed)
    task.reset()  # the same batches for every estimator
    model.train()
    moes = task.moes(model)
    windows = [LoadWindow(m.num_experts, window) for m in moes]
    optimizer = torch.optim.Adam(model.parameters(), lr=task.lr)
    hist = {k: [] for k in ("step", "time", "train_loss", "eval_step", "eval_time", "val_loss",
                            "purity", "bits_per_char", "load", "load_cv", "max_violation",
                            "entropy", "dead", "diag_step", "cos_exact", "cos_exact_sample",
                            "cos_dense", "rel_err_exact", "variance")}
    elapsed, step, last_routing, durations = 0.0, 0, None, []
    reference = None  # the forward weight rule of the exact reference (diagnostics only)

    def record_eval() -> None:
        metrics = task.evaluate(model)
        hist["eval_step"].append(step)
        hist["eval_time"].append(elapsed)
        hist["val_loss"].append(metrics["val_loss"])
        hist["purity"].append(metrics.get("purity"))
        hist["bits_per_char"].append(metrics.get("bits_per_char"))
        counts = [w.counts.double() for w in windows]
        load = [(c / c.sum()).tolist() if float(c.sum()) else c.tolist() for c in counts]
        hist["load"].append(load[0])
        hist["load_cv"].append(sum(load_cv(c) for c in counts) / len(counts))
        hist["max_violation"].append(sum(max_violation(c) for c in counts) / len(counts))
        hist["dead"].append(sum(w.dead for w in windows) if step else 0)
        hist["entropy"].append(None if last_routing is None else
                               sum(router_entropy(r.scores) for r in last_routing) / len(last_routing))

    def record_diag() -> None:
        nonlocal reference
        probe = task.probe(model)
        if probe is None:
            return
        fid = gradient_fidelity(probe.moe, probe.x, probe.loss_fn, [estimator],
                                samples=diag_samples, tau=tau, seed=seed + step,
                                options={estimator: {k: v for k, v in options.items()
                                                     if k != "generator"}})[estimator]
        hist["diag_step"].append(step)
        for key in ("cos_exact", "cos_dense", "rel_err_exact", "variance"):
            hist[key].append(getattr(fid, key))
        hist["cos_exact_sample"].append(fid.sample_cos_exact)
        reference = fid.reference

    record_eval()
    if diag_every:
        record_diag()
    while step < steps and elapsed < time_budget:
        batch = task.batch(step)
        start = time.perf_counter()
        loss, aux, outs = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        (loss + aux).backward()
        optimizer.step()
        durations.append(time.perf_counter() - start)
        elapsed += durations[-1]
        step += 1
        for w, out in zip(windows, outs):
            w.update(out.stats.tokens_per_expert)
        last_routing = [o.routing for o in outs]
        hist["step"].append(step)
        hist["time"].append(elapsed)
        hist["train_loss"].append(loss.item())
        if on_step is not None:
            on_step()
        if step % eval_every == 0 or step == steps:
            record_eval()
        if diag_every and (step % diag_every == 0 or step == steps):
            record_diag()
    if hist["eval_step"][-1] != step:
        record_eval()
        if diag_every:
            record_diag()
    return {"estimator": estimator, "seed": seed, "steps": step, "train_time": elapsed,
            "ms_per_step": 1000 * statistics.median(durations) if durations else 0.0,
            "ms_per_step_mean": 1000 * elapsed / max(step, 1),
            "stopped_by": "steps" if step >= steps else "time", "reference": reference,
            "history": hist}
