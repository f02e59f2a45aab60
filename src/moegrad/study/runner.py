"""Run one study cell: every estimator on every seed (after pretraining, for ``--regime
finetune``), then the shared-checkpoint fidelity, and write the cell's directory (metrics.json,
report.md, PNGs). :func:`run_study` is the library form of ``moegrad study``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

from moegrad.study.fidelity import shared_checkpoint_fidelity
from moegrad.study.metrics import aggregate
from moegrad.study.plots import write_plots
from moegrad.study.progress import Progress, run_seconds
from moegrad.study.report import write_report
from moegrad.study.settings import FIDELITY_TAUS, Cell
from moegrad.study.train import pretrain, state_copy, train_run


def run_study(task_name: str = "clusters", estimators: Optional[list] = None, *, quick: bool = False,
              steps: Optional[int] = None, seeds: Optional[int] = None,
              time_budget: Optional[float] = None, losses: Optional[dict] = None,
              eval_every: Optional[int] = None, diag_every: Optional[int] = None,
              diag_samples: int = 8, tau: float = 1.0, impl: str = "auto",
              out: Optional[Path] = None, progress=True, command: str = "moegrad study",
              top_k: Optional[int] = None, experts: Optional[int] = None,
              router_init: Optional[str] = None, lr: Optional[float] = None,
              clusters: Optional[int] = None, dim: Optional[int] = None,
              layers: Optional[int] = None, width: Optional[int] = None,
              regime: str = "scratch", pretrain_steps: Optional[int] = None,
              flops_budget: Optional[float] = None, cell: Optional[str] = None,
              fidelity: bool = True, routing: Optional[str] = None,
              balancer: Optional[str] = None) -> dict:
    """Run a study (one cell) and write its directory; returns the metrics.json document.

    ``top_k`` ... ``width`` set the task (None: the task's default, see
    :data:`~moegrad.study.settings.TASK_KNOBS`);
    ``regime`` "scratch" or "finetune"; ``routing`` every MoE layer's ``routing=`` (None:
    "topk"; "sinkhorn" runs the deterministic estimators only, "expert_choice" topk only,
    "remoe" its one run named "remoe"); ``balancer`` None/"none", "bias" or "quantile"
    (:class:`~moegrad.study.settings.Cell`); ``progress``: True/False or a :class:`Progress`
    shared by the cells of a grid; ``fidelity``: measure every estimator's router gradient on
    shared checkpoints of seed 0 (tasks with a probe). Raises ValueError on bad settings
    before training anything.
    """
    options = {"top_k": top_k, "experts": experts, "router_init": router_init, "lr": lr,
               "clusters": clusters, "dim": dim, "layers": layers, "width": width}
    spec = Cell(task_name, estimators, quick=quick, steps=steps, seeds=seeds,
                time_budget=time_budget, losses=losses, eval_every=eval_every,
                diag_every=diag_every, diag_samples=diag_samples, tau=tau, impl=impl,
                regime=regime, pretrain_steps=pretrain_steps, options=options,
                flops_budget=flops_budget, routing=routing, balancer=balancer)
    out = Path(out or f"study-{task_name}")
    own = not isinstance(progress, Progress)
    bar = Progress(bool(progress), f"study {task_name}") if own else progress
    if own:
        spec.price(bar, "cell")
        bar.start()
    doc = run_cell(spec, out, command, bar, cell, fidelity)
    if own:
        bar.close()
    return doc


def run_cell(spec: Cell, out: Path, command: str, bar: Progress, cell: Optional[str],
             fidelity: bool) -> dict:
    """Train the cell ``spec`` (every estimator on every seed, advancing ``bar``), then measure
    the shared-checkpoint fidelity, and write ``out`` (metrics.json, report.md, PNGs; ``command``
    is the report's "Reproduce" line, ``cell`` its name). Returns the metrics.json document."""
    out.mkdir(parents=True, exist_ok=True)
    runs, pretrained, checkpoints, fid_task = [], [], [], None
    for seed in range(spec.seeds):
        task = spec.task(seed)
        init_state, info = None, None
        if spec.regime == "finetune":
            seconds = run_seconds(getattr(spec, "pretrain_cost", {}), spec.pretrain_steps,
                                  spec.eval_every, 0)
            on_step, finish = bar.run(f"pretrain topk seed {seed}", spec.pretrain_steps, seconds)
            init_state, info = pretrain(task, seed, steps=spec.pretrain_steps,
                                        time_budget=spec.time_budget, eval_every=spec.eval_every,
                                        on_step=on_step)
            finish(info["steps"])
            pretrained.append(info)
            task = task.shifted()
            spec.configure(task)
        if seed == 0:
            fid_task = task
        for name in spec.names:
            keep = (seed == 0 and fidelity and spec.cls.has_truth and not spec.na
                    and name in spec.fidelity_names())
            on_step, finish = bar.run(f"{name} seed {seed}", spec.steps, spec.run_seconds(name))
            with warnings.catch_warnings():  # the study measures these on purpose (report.md says so)
                warnings.filterwarnings("ignore", "estimator=.* gives the router no task gradient",
                                        UserWarning)
                run = train_run(
                    task, name, seed, steps=spec.steps, time_budget=spec.time_budget,
                    eval_every=spec.eval_every, diag_every=spec.diag_every,
                    diag_samples=spec.diag_samples, tau=spec.tau, losses=spec.losses,
                    on_step=on_step, regime=spec.regime, init_state=init_state,
                    checkpoints=spec.checkpoint_steps() if keep else (),
                    on_checkpoint=(lambda step, model, name=name: _keep(checkpoints, name, step,
                                                                        state_copy(model)))
                    if keep else None)
            finish(run["steps"])
            if info is not None:
                run["pretrain"] = info
            runs.append(run)
    args = {"steps": spec.steps, "seeds": spec.seeds, "time_budget": spec.time_budget,
            "losses": spec.losses, "eval_every": spec.eval_every, "diag_every": spec.diag_every,
            "diag_samples": spec.diag_samples, "tau": spec.tau, "impl": spec.impl,
            "quick": spec.quick, "estimators": spec.names, "regime": spec.regime,
            "routing": spec.routing, "balancer": spec.balancer,
            "cell": cell or "default"}
    if spec.flops_budget is not None:
        args["flops_budget"] = spec.flops_budget
    if spec.regime == "finetune":
        args["pretrain_steps"] = spec.pretrain_steps
    doc = aggregate(runs, fid_task, args)
    doc.setdefault("settings", runs[0]["settings"])
    doc.setdefault("cell", cell or "default")
    if spec.na:  # what does not apply to this cell's routing, and why
        doc["not_applicable"] = dict(spec.na)
    if pretrained:
        doc["pretrain"] = pretrained
    if checkpoints and spec.cls.has_truth:
        on_step, finish = bar.run("shared-checkpoint fidelity", 0, spec.fidelity_seconds())
        result = _shared_fidelity(fid_task, checkpoints, spec)
        if result is not None:
            doc["fidelity"] = result
        finish(0)
    doc["runs"] = runs
    write_plots(runs, doc, out)
    write_report(doc, out, command)
    return doc


def _keep(checkpoints: list, name: str, step: int, state: dict) -> None:
    """Add a checkpoint of trajectory ``name``; the step-0 state is the same for every
    trajectory (same seed, same initial or pretrained weights), so it is kept once, as
    ``start@0``."""
    if step == 0:
        if any(c["step"] == 0 for c in checkpoints):
            return
        checkpoints.append({"label": "start@0", "step": 0, "state": state})
    else:
        checkpoints.append({"label": f"{name}@{step}", "step": step, "state": state})


def _shared_fidelity(task, checkpoints: list, spec: Cell) -> Optional[dict]:
    """moegrad.study.fidelity.shared_checkpoint_fidelity on seed 0's checkpoints."""
    taus = tuple(sorted(set(FIDELITY_TAUS) | {spec.tau}))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "estimator=.* gives the router no task gradient",
                                UserWarning)
        return shared_checkpoint_fidelity(task, checkpoints, spec.names, taus=taus,
                                          samples=spec.diag_samples, seed=0)
