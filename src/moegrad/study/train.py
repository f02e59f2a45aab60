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

``history["active"]`` is the mean number of experts per token since the previous evaluation
(K under token choice, the chosen pairs per token under expert_choice and remoe, whose runs
have no gradient diagnostics: ``run["diagnostics"]`` says why; nor have the runs of
``task.balancer`` "bias"/"quantile", whose balancer steps after every optimizer step).

Compute: ``history["flops"]`` is the cumulative training FLOPs at each evaluation and
``flops_per_step`` their mean per step, counted from what each step evaluated
(:mod:`moegrad.study.flops`). ``time_limited`` flags a run cut by the clock.

Regimes: ``scratch`` trains from the task's initialisation; ``finetune`` starts from a
pretrained state (:func:`pretrain`: ``topk`` + switch loss 0.01 on the task's own
distribution) and trains on the shifted one (:meth:`~moegrad.study.task.Task.shifted`);
the run then also has ``before`` (the checkpoint's held-out loss and purity on the shifted
distribution, under the fine-tuning estimator's forward: the same for the estimators that
keep ``topk``'s forward, different for those with unit weights such as ``unweighted``,
``straight_through`` or top-1 ``noisy_topk``, and for ``sparsemixer``) and ``drift``
(:func:`moegrad.diagnostics.compare_routing` between the checkpoint and the fine-tuned model on
the validation inputs).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable, Optional

import torch

from moegrad import estimators as registry
from moegrad._checks import check_choice
from moegrad.balancing import BiasBalancer, QuantileBalancer
from moegrad.diagnostics import (LoadWindow, compare_routing, gradient_fidelity, load_cv,
                                 max_violation, router_entropy)
from moegrad.study.fidelity import load_checkpoint
from moegrad.study.flops import COMPONENTS, step_flops
from moegrad.study.options import BALANCERS, NO_ESTIMATOR, PAIR_ROUTINGS
from moegrad.study.task import REGIMES, active_experts

#: the pretraining recipe of ``--regime finetune`` (token-choice routings; see pretrain_recipe)
PRETRAIN_ESTIMATOR = "topk"
PRETRAIN_LOSSES = {"switch": 0.01}
#: why the pair routings (``Routing.chosen``) have no gradient diagnostics and no routing drift
PAIR_NA = ("n/a under routing={routing!r}: a token gets 0..E experts (Routing.chosen), while the "
           "exact reference enumerates each token's top-k subsets and the drift compares top-k sets")

#: why ``--balancer bias|quantile`` runs have no gradient diagnostics
BIAS_NA = ("n/a with --balancer {balancer}: the exact reference samples top-k from softmax(z / tau) "
           "and cannot model the selection-only bias (moegrad.diagnostics refuses selection_bias)")


def diagnostics_na(routing: str, balancer: str):
    """Why a run with ``routing`` and ``balancer`` has no gradient diagnostics (None: it has)."""
    if routing in PAIR_ROUTINGS:
        return PAIR_NA.format(routing=routing)
    if balancer != "none":
        return BIAS_NA.format(balancer=balancer)
    return None


def pretrain_recipe(routing: str) -> tuple[str, dict]:
    """(estimator, losses) of ``--regime finetune``'s pretraining under ``routing``: topk +
    switch 0.01 for token choice; the routing's own estimator (topk for expert_choice, none for
    remoe) and no balance loss for the pair routings (they take z_loss only)."""
    if routing == "remoe":
        return NO_ESTIMATOR, {}
    if routing in PAIR_ROUTINGS:
        return PRETRAIN_ESTIMATOR, {}
    return PRETRAIN_ESTIMATOR, dict(PRETRAIN_LOSSES)


def is_sampling(estimator: str) -> bool:
    """Whether the study's ``estimator`` samples (:data:`NO_ESTIMATOR`, remoe: no)."""
    return estimator != NO_ESTIMATOR and bool(registry.get(estimator).samples)


def make_balancer(name: str, model: torch.nn.Module):
    """``--balancer`` ``name`` -> None ("none"), :class:`moegrad.BiasBalancer` ("bias", its
    default gamma 1e-3) or :class:`moegrad.QuantileBalancer` ("quantile") over ``model``'s
    routers (built with ``selection_bias=True``)."""
    check_choice("balancer", name, BALANCERS)
    if name == "none":
        return None
    return (BiasBalancer if name == "bias" else QuantileBalancer)(model)
#: ``checkpoints`` entry meaning "the last step of the run, whenever it stops"
END = -1


def state_copy(model: torch.nn.Module) -> dict:
    """A detached copy of ``model.state_dict()`` (in memory)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_step(task, model: torch.nn.Module, optimizer, batch, balancer=None) -> tuple:
    """One optimiser step on ``task.loss`` + its balance losses (then ``balancer.step()``, the
    selection-bias update) -> (task loss, the layers' MoEOutputs)."""
    loss, aux, outs = task.loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    (loss + aux).backward()
    optimizer.step()
    if balancer is not None:
        balancer.step()
    return loss, outs


def train_run(task, estimator: str, seed: int, *, steps: int, time_budget: float,
              eval_every: int, diag_every: int, diag_samples: int = 8, tau: float = 1.0,
              losses: Optional[dict] = None, options: Optional[dict] = None,
              window: int = 50, on_step: Optional[Callable] = None, regime: str = "scratch",
              init_state: Optional[dict] = None, checkpoints: Iterable[int] = (),
              on_checkpoint: Optional[Callable] = None) -> dict:
    """Train one model; return its history and final metrics (a JSON-ready dict).

    ``ms_per_step`` is the median step time (robust to other processes stealing the CPU for a
    while); ``ms_per_step_mean`` is train_time / steps. ``settings`` records the cell
    (:meth:`~moegrad.study.task.Task.settings` plus regime and losses).

    ``on_step()`` is called after every optimiser step (the progress bar).
    ``regime="finetune"`` needs ``init_state`` (from :func:`pretrain`) and ``task`` the shifted
    task; it adds ``before`` and ``drift``. ``on_checkpoint(step, model)`` is called at the
    steps in ``checkpoints`` (``END``: the run's last step), e.g. to keep :func:`state_copy`.
    """
    check_choice("regime", regime, REGIMES)
    if (regime == "finetune") != (init_state is not None):
        raise ValueError(f"regime={regime!r} {'needs' if regime == 'finetune' else 'takes no'} "
                         "init_state (the pretrained checkpoint of --regime finetune)")
    losses = {} if losses is None else losses
    options = dict(options or {})
    if is_sampling(estimator) and "generator" in registry.get(estimator).options:
        options.setdefault("generator", torch.Generator().manual_seed(50_000 + seed))
    model = task.build(estimator, options, losses, seed)
    if init_state is not None:  # the pretrained layers; this estimator's own state stays fresh
        load_checkpoint(model, init_state, "pretrained")
    start_state = state_copy(model) if regime == "finetune" else None
    task.reset()  # the same batches for every estimator
    model.train()
    moes = task.moes(model)
    windows = [LoadWindow(m.num_experts, window) for m in moes]
    optimizer = torch.optim.Adam(model.parameters(), lr=task.lr)
    balancer = make_balancer(task.balancer, model)
    pair = task.routing in PAIR_ROUTINGS
    na = diagnostics_na(task.routing, task.balancer)
    diag_every = 0 if na else diag_every
    active = []  # experts per token of every MoE layer at every step since the last evaluation
    hist = {k: [] for k in ("step", "time", "train_loss", "eval_step", "eval_time", "val_loss",
                            "purity", "bits_per_char", "load", "load_cv", "max_violation",
                            "entropy", "dead", "active", "flops", "diag_step", "cos_exact",
                            "cos_exact_sample", "cos_dense", "rel_err_exact", "variance")}
    elapsed, step, last_routing, durations = 0.0, 0, None, []
    flops = dict.fromkeys(COMPONENTS + ("total",), 0)
    reference = None  # the forward weight rule of the exact reference (diagnostics only)
    wanted = set(checkpoints) if on_checkpoint is not None else set()

    def record_eval() -> None:
        metrics = task.evaluate(model)
        hist["eval_step"].append(step)
        hist["eval_time"].append(elapsed)
        hist["flops"].append(flops["total"])
        hist["val_loss"].append(metrics["val_loss"])
        hist["purity"].append(metrics.get("purity"))
        hist["bits_per_char"].append(metrics.get("bits_per_char"))
        counts = [w.counts.double() for w in windows]
        load = [(c / c.sum()).tolist() if float(c.sum()) else c.tolist() for c in counts]
        hist["load"].append(load[0])
        hist["load_cv"].append(sum(load_cv(c) for c in counts) / len(counts))
        hist["max_violation"].append(sum(max_violation(c) for c in counts) / len(counts))
        hist["dead"].append(sum(w.dead for w in windows) if step else 0)
        hist["active"].append(sum(active) / len(active) if active else None)
        active.clear()
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
    if 0 in wanted:
        on_checkpoint(0, model)
    while step < steps and elapsed < time_budget:
        batch = task.batch(step)
        start = time.perf_counter()
        loss, outs = train_step(task, model, optimizer, batch, balancer)
        durations.append(time.perf_counter() - start)
        elapsed += durations[-1]
        step += 1
        for key, value in step_flops(task, model, batch, outs).items():
            flops[key] += value
        for w, out in zip(windows, outs):
            w.update(out.stats.tokens_per_expert)
        last_routing = [o.routing for o in outs]
        active.extend(active_experts(r) for r in last_routing)
        hist["step"].append(step)
        hist["time"].append(elapsed)
        hist["train_loss"].append(loss.item())
        if on_step is not None:
            on_step()
        if step % eval_every == 0 or step == steps:
            record_eval()
        if diag_every and (step % diag_every == 0 or step == steps):
            record_diag()
        if step in wanted and step < steps:
            on_checkpoint(step, model)
    if hist["eval_step"][-1] != step:
        record_eval()
        if diag_every:
            record_diag()
    if (END in wanted or steps in wanted) and step > 0:
        on_checkpoint(step, model)
    stopped_by = "steps" if step >= steps else "time"
    run = {"estimator": estimator, "seed": seed, "steps": step, "train_time": elapsed,
           "ms_per_step": 1000 * statistics.median(durations) if durations else 0.0,
           "ms_per_step_mean": 1000 * elapsed / max(step, 1),
           "stopped_by": stopped_by, "time_limited": stopped_by == "time",
           "settings": {**task.settings(), "regime": regime, "losses": dict(losses)},
           "flops_per_step": flops["total"] / step if step else 0.0,
           "flops_per_step_by_part": {k: flops[k] / step if step else 0.0 for k in COMPONENTS},
           "reference": reference, "history": hist}
    if na:
        run["diagnostics"] = na
    if regime == "finetune":
        run["before"] = {"val_loss": hist["val_loss"][0], "purity": hist["purity"][0]}
        run["drift"] = (None if pair else
                        routing_drift(task, estimator, losses, seed, start_state, model))
    return run


def routing_drift(task, estimator: str, losses: dict, seed: int, start_state: dict,
                  model: torch.nn.Module) -> list:
    """:func:`moegrad.diagnostics.compare_routing` between the model at the start of fine-tuning
    (rebuilt from ``start_state``) and ``model``, on the task's validation inputs
    (compare_routing runs both in eval mode, deterministic top-k, and restores their modes)."""
    start = task.build(estimator, {}, losses, seed)
    start.load_state_dict(start_state)
    return compare_routing(start, model, task.val_inputs())


def pretrain(task, seed: int, *, steps: int, time_budget: float, eval_every: int,
             on_step: Optional[Callable] = None) -> tuple[dict, dict]:
    """Pretrain for ``--regime finetune``: :func:`pretrain_recipe` of ``task.routing``
    (:data:`PRETRAIN_ESTIMATOR` with :data:`PRETRAIN_LOSSES` for token choice) on ``task``
    (the unshifted distribution) from the model seed ``seed``, with the task's balancer.
    Returns (state_dict copy of the final model, a JSON-ready summary)."""
    keep = {}
    estimator, losses = pretrain_recipe(task.routing)
    run = train_run(task, estimator, seed, steps=steps, time_budget=time_budget,
                    eval_every=eval_every, diag_every=0, losses=losses,
                    on_step=on_step, checkpoints=(END,),
                    on_checkpoint=lambda step, model: keep.update(state=state_copy(model)))
    if "state" not in keep:
        raise ValueError(f"pretraining ran no step (steps={steps}, time_budget={time_budget})")
    h = run["history"]
    info = {"estimator": estimator, "losses": losses, "seed": seed,
            "steps": run["steps"], "train_time": run["train_time"],
            "time_limited": run["time_limited"], "flops": h["flops"][-1],
            "val_loss": h["val_loss"][-1], "purity": h["purity"][-1]}
    return keep["state"], info


def time_costs(task, estimator: str, seed: int = 0, *, losses: Optional[dict] = None,
               diag: bool = True, diag_samples: int = 8, tau: float = 1.0,
               steps: int = 3) -> dict:
    """Seconds of one training step, one evaluation and one gradient diagnostic of
    ``estimator`` on ``task``, measured on a throwaway model (one unmeasured warm-up step,
    then the median of ``steps``). The progress bar's cost model; the training batch stream
    is reset afterwards, so the study's runs are unchanged."""
    losses = {} if losses is None else losses
    model = task.build(estimator, {}, losses, seed)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=task.lr)
    balancer = make_balancer(task.balancer, model)
    task.reset()
    times = []
    for i in range(steps + 1):
        batch = task.batch(i)
        start = time.perf_counter()
        train_step(task, model, optimizer, batch, balancer)
        times.append(time.perf_counter() - start)
    task.reset()
    start = time.perf_counter()
    task.evaluate(model)
    evaluate = time.perf_counter() - start
    diagnostic = 0.0
    probe = task.probe(model) if diag and not diagnostics_na(task.routing, task.balancer) else None
    if probe is not None:
        start = time.perf_counter()
        gradient_fidelity(probe.moe, probe.x, probe.loss_fn, [estimator], samples=diag_samples,
                          tau=tau, seed=seed)
        diagnostic = time.perf_counter() - start
    return {"step": statistics.median(times[1:]), "eval": evaluate, "diag": diagnostic}
