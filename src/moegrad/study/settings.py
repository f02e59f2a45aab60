"""The settings of one study cell: the task's knobs (``--top-k`` ... ``--width``), checked
against the task, and :class:`Cell`, everything :func:`moegrad.study.runner.run_study` resolved
(defaults applied, values checked before anything trains) and what its runs cost."""

from __future__ import annotations

import inspect
import math

from moegrad import estimators as registry
from moegrad._spec import DETERMINISTIC, TOKEN_CHOICE_ROUTINGS, check_routing
from moegrad.experts import IMPLS
from moegrad.study.progress import Progress, run_seconds
from moegrad.study.tasks import REGIMES, get_task
from moegrad.study.train import END

#: task -> {option name (run_study keyword): the task constructor's argument}
TASK_KNOBS = {"clusters": {"top_k": "top_k", "experts": "num_experts", "router_init": "router_init",
                           "lr": "lr", "clusters": "num_classes", "dim": "dim"},
              "charlm": {"top_k": "top_k", "experts": "num_experts", "router_init": "router_init",
                         "lr": "lr", "layers": "layers", "width": "dim"}}
#: option name (run_study keyword) -> its command-line flag
FLAGS = {"top_k": "--top-k", "experts": "--experts", "router_init": "--router-init",
         "lr": "--lr", "clusters": "--clusters", "dim": "--dim", "layers": "--layers",
         "width": "--width", "routing": "--routing"}
#: trajectories whose checkpoints (steps 0, 1/4, 1/2, end of seed 0) every estimator's router
#: gradient is measured on (moegrad.study.fidelity.shared_checkpoint_fidelity)
FIDELITY_TRAJECTORIES = ("topk", "dense")
#: temperatures of the exact reference in the shared-checkpoint fidelity (a tau sweep)
FIDELITY_TAUS = (0.5, 1.0, 2.0)


def task_kwargs(task_name: str, options: dict) -> dict:
    """Options of run_study (``top_k``, ``experts``, ``router_init``, ``lr``, ``clusters``,
    ``dim``, ``layers``, ``width``; None = the task's default) -> the task constructor's
    keyword arguments, checked: ValueError naming the command-line option and what is allowed."""
    cls = get_task(task_name)
    knobs = TASK_KNOBS.get(task_name, {})
    for key, value in options.items():
        if value is not None and key not in knobs:
            applies = [t for t, k in TASK_KNOBS.items() if key in k]
            raise ValueError(f"{FLAGS[key]} applies to --task {' or '.join(applies)} only, "
                             f"not {task_name}")
    kwargs = {knobs[k]: v for k, v in options.items() if v is not None}
    defaults = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()}
    merged = {**{k: defaults.get(k) for k in knobs.values()}, **kwargs}
    experts, top_k = merged["num_experts"], merged["top_k"]
    if top_k > experts:
        raise ValueError(f"--top-k {top_k} exceeds --experts {experts}; choose 1 <= top-k <= experts")
    if task_name == "clusters" and experts < merged["num_classes"]:
        raise ValueError(f"--experts {experts} is fewer than the {merged['num_classes']} clusters "
                         "(--clusters); the clusters task needs --experts >= --clusters")
    if task_name == "charlm" and merged["dim"] % defaults["heads"]:
        raise ValueError(f"--width {merged['dim']} must be a multiple of the "
                         f"{defaults['heads']} attention heads")
    return kwargs


class Cell:
    """Everything run_study resolved for one cell (defaults applied, checked).

    ``task(seed)`` builds the task, ``price(progress, key)`` adds the cell's estimated seconds
    to a :class:`~moegrad.study.progress.Progress`. ``routing`` (None = "topk") is every MoE
    layer's ``routing=`` (pretraining included); a routing other than "topk" takes the
    deterministic estimators only (all of them by default)."""

    def __init__(self, task_name, names, *, quick, steps, seeds, time_budget, losses, eval_every,
                 diag_every, diag_samples, tau, impl, regime, pretrain_steps, options,
                 flops_budget=None, routing=None) -> None:
        self.cls = get_task(task_name)
        self.task_name = task_name
        self.routing = check_routing("topk" if routing is None else routing)
        if self.routing not in TOKEN_CHOICE_ROUTINGS:
            raise ValueError(f"routing={self.routing!r} is not supported by moegrad study yet "
                             "(its metrics read Routing.indices as each token's top-k experts); "
                             f"choose one of {list(TOKEN_CHOICE_ROUTINGS)}")
        usable = registry.available() if self.routing == "topk" else list(DETERMINISTIC)
        self.names = list(names or usable)
        refused = [n for n in self.names if n not in usable]
        if refused:
            raise ValueError(f"--routing {self.routing} cannot be combined with the sampling "
                             f"estimator(s) {refused} (they select by sampling); choose from "
                             f"{usable}")
        default_steps, default_seeds = self.cls.quick if quick else self.cls.full
        self.steps = steps or default_steps
        self.seeds = seeds or default_seeds
        self.time_budget = time_budget if time_budget is not None else (60.0 if quick else 300.0)
        if not (isinstance(self.time_budget, (int, float)) and self.time_budget > 0):
            raise ValueError(f"time_budget={self.time_budget} must be > 0 seconds")
        self.eval_every = eval_every or max(1, self.steps // 20)
        self.diag_every = max(1, self.steps // 5) if diag_every is None else diag_every
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is not supported; choose one of {list(IMPLS)}")
        if self.diag_every < 0:
            raise ValueError(f"diag_every={self.diag_every} must be >= 0 (0 skips the diagnostics)")
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau={tau} must be a finite number > 0 (the temperature of the "
                             "sampled top-k policy of the exact reference)")
        regime = regime or "scratch"
        if regime not in REGIMES:
            raise ValueError(f"regime={regime!r} is not supported; choose one of {list(REGIMES)}")
        self.regime, self.quick, self.impl, self.tau = regime, quick, impl, tau
        self.diag_samples = diag_samples
        if flops_budget is not None and not (isinstance(flops_budget, (int, float))
                                             and math.isfinite(flops_budget) and flops_budget > 0):
            raise ValueError(f"flops_budget={flops_budget} must be a finite number > 0")
        self.flops_budget = flops_budget
        self.pretrain_steps = pretrain_steps or self.steps
        self.losses = dict(losses or {})
        self.kwargs = task_kwargs(task_name, options)
        self.cls(0, **self.kwargs)  # the task's own checks, before anything runs

    def task(self, seed: int):
        task = self.cls(seed, **self.kwargs)
        task.impl, task.routing = self.impl, self.routing
        return task

    def fidelity_names(self) -> list:
        return [n for n in FIDELITY_TRAJECTORIES if n in self.names] or self.names[:1]

    def checkpoint_steps(self) -> tuple:
        return tuple(sorted({0, self.steps // 4, self.steps // 2})) + (END,)

    def price(self, progress: Progress, key) -> None:
        """Add this cell's estimated seconds to ``progress`` (warm-up measured); keeps the
        per-estimator costs in ``self.costs`` (and ``self.pretrain_cost``)."""
        self.costs, self.pretrain_cost = {}, {}
        if not progress.enabled:
            return
        task = self.task(0)
        self.costs = progress.price(key, task, self.names, losses=self.losses,
                                    diag=bool(self.diag_every), diag_samples=self.diag_samples,
                                    tau=self.tau)
        if self.regime == "finetune":
            self.pretrain_cost = progress.price(("pretrain", key), task, ["topk"],
                                                losses={"switch": 0.01}, diag=False,
                                                diag_samples=1, tau=self.tau)["topk"]
        for _ in range(self.seeds):
            if self.regime == "finetune":
                progress.add(run_seconds(self.pretrain_cost, self.pretrain_steps,
                                         self.eval_every, 0), self.pretrain_steps)
            for n in self.names:
                progress.add(self.run_seconds(n), self.steps)
        progress.add(self.fidelity_seconds())

    def run_seconds(self, name: str) -> float:
        return run_seconds(getattr(self, "costs", {}).get(name, {}), self.steps,
                           self.eval_every, self.diag_every)

    def fidelity_seconds(self) -> float:
        """Estimated cost of the shared-checkpoint fidelity (0 for tasks without a probe)."""
        costs = getattr(self, "costs", {})
        if not costs or not self.cls.has_truth:
            return 0.0
        ckpts = 1 + (len(self.checkpoint_steps()) - 1) * len(self.fidelity_names())
        return ckpts * sum(costs[n]["diag"] for n in self.names) * len(FIDELITY_TAUS)
