"""The settings of one study cell: the task's knobs (``--top-k`` ... ``--width``), checked
against the task, and :class:`Cell`, everything :func:`moegrad.study.runner.run_study` resolved
(defaults applied, values checked before anything trains) and what its runs cost."""

from __future__ import annotations

import inspect
import math

from moegrad import estimators as registry
from moegrad._spec import DETERMINISTIC, check_routing
from moegrad.experts import IMPLS
from moegrad.study.options import (BALANCERS, FIDELITY_TAUS, FIDELITY_TRAJECTORIES,  # noqa: F401
                                   FLAGS, NO_ESTIMATOR, PAIR_ROUTINGS, ROUTING_ESTIMATORS,
                                   ROUTING_LOSSES, TASK_KNOBS)
from moegrad.study.progress import Progress, run_seconds
from moegrad.study.tasks import REGIMES, get_task
from moegrad.study.train import END, diagnostics_na, pretrain_recipe

#: the router initialisation of ``--routing remoe`` on a task whose default is "zero"
REMOE_ROUTER_INIT = "normal"


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
    layer's ``routing=`` (pretraining included): "topk" takes every estimator, "sinkhorn" the
    deterministic ones (all of them by default), "expert_choice" "topk" only and "remoe" none
    (its one run per seed is named :data:`~moegrad.study.options.NO_ESTIMATOR`); the pair
    routings take the balance loss z_loss only and have no gradient diagnostics (PAIR_NA).
    ``balancer`` (None = "none"; "bias", "quantile") builds the layers with
    ``selection_bias=True`` and steps that balancer after every optimiser step: routing "topk"
    and the deterministic estimators only."""

    def __init__(self, task_name, names, *, quick, steps, seeds, time_budget, losses, eval_every,
                 diag_every, diag_samples, tau, impl, regime, pretrain_steps, options,
                 flops_budget=None, routing=None, balancer=None) -> None:
        self.cls = get_task(task_name)
        self.task_name = task_name
        self.routing = check_routing("topk" if routing is None else routing)
        self.balancer = "none" if balancer is None else balancer
        if self.balancer not in BALANCERS:
            raise ValueError(f"balancer={self.balancer!r} is unknown; choose one of {list(BALANCERS)}")
        if self.balancer != "none" and self.routing != "topk":
            raise ValueError(f"--balancer {self.balancer} needs --routing topk (got "
                             f"{self.routing}): routing={self.routing!r} refuses selection_bias "
                             "(sinkhorn balances by its column scaling, expert_choice by "
                             "construction, remoe by its L1 penalty)")
        self.names = self._estimators(names)
        na = diagnostics_na(self.routing, self.balancer)
        self.na = {"diagnostics": na} if na else {}
        default_steps, default_seeds = self.cls.quick if quick else self.cls.full
        self.steps = steps or default_steps
        self.seeds = seeds or default_seeds
        self.time_budget = time_budget if time_budget is not None else (60.0 if quick else 300.0)
        if not (isinstance(self.time_budget, (int, float)) and self.time_budget > 0):
            raise ValueError(f"time_budget={self.time_budget} must be > 0 seconds")
        self.eval_every = eval_every or max(1, self.steps // 20)
        self.diag_every = max(1, self.steps // 5) if diag_every is None else diag_every
        if self.diag_every < 0:
            raise ValueError(f"diag_every={self.diag_every} must be >= 0 (0 skips the diagnostics)")
        if self.na:
            self.diag_every = 0  # self.na["diagnostics"]
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is not supported; choose one of {list(IMPLS)}")
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
        allowed = ROUTING_LOSSES.get(self.routing)
        if allowed is not None and set(self.losses) - set(allowed):
            raise ValueError(f"--losses {','.join(sorted(self.losses))} with --routing "
                             f"{self.routing}: this routing takes the balance loss(es) "
                             f"{list(allowed)} only (default: none)")
        self.kwargs = task_kwargs(task_name, self._remoe_init(task_name, options))
        self.cls(0, **self.kwargs)  # the task's own checks, before anything runs

    def _remoe_init(self, task_name: str, options: dict) -> dict:
        """ReMoE's gates are ReLU(x W^T): with a zero router every gate is 0, no token reaches an
        expert and ReLU passes no gradient, so nothing ever trains. Under routing "remoe" a task
        whose default router init is "zero" (clusters) gets :data:`REMOE_ROUTER_INIT` instead
        (recorded in the settings); an explicit ``--router-init zero`` is a ValueError."""
        if self.routing != "remoe":
            return options
        if options.get("router_init") == "zero":
            raise ValueError("--router-init zero with --routing remoe: every ReLU gate is then 0, "
                             "no token reaches an expert and the router gets no gradient; use "
                             f"--router-init normal or uniform (default under remoe: "
                             f"{REMOE_ROUTER_INIT})")
        if options.get("router_init") is None and self.cls.router_init_default() == "zero":
            return {**options, "router_init": REMOE_ROUTER_INIT}
        return options

    def _estimators(self, names) -> list:
        """The cell's estimator names (``names`` None: every one its routing and balancer take)."""
        fixed = ROUTING_ESTIMATORS.get(self.routing)
        if self.routing == "remoe" and names:
            raise ValueError(f"--estimators {','.join(names)} cannot be combined with --routing "
                             "remoe: ReMoE takes no estimator (its ReLU gates are "
                             f"differentiable); its one run per seed is named {NO_ESTIMATOR!r}. "
                             "Leave --estimators unset")
        if fixed is not None:
            usable = list(fixed)
            why = "it takes estimator 'topk' only"
        elif self.routing == "topk" and self.balancer == "none":
            usable, why = registry.available(), ""
        else:
            usable = list(DETERMINISTIC)
            why = ("they select by sampling" if self.balancer == "none" else
                   f"they select by sampling and refuse the selection_bias of --balancer {self.balancer}")
        chosen = list(names or usable)
        refused = [n for n in chosen if n not in usable]
        if refused:
            where = f"--routing {self.routing}" + (f" --balancer {self.balancer}"
                                                   if self.balancer != "none" else "")
            raise ValueError(f"{where} cannot be combined with the estimator(s) {refused} "
                             f"({why}); choose from {usable}")
        return chosen

    def task(self, seed: int):
        task = self.cls(seed, **self.kwargs)
        self.configure(task)
        return task

    def configure(self, task) -> None:
        """Set the cell's impl, routing and balancer on ``task`` (e.g. a :meth:`shifted` one)."""
        task.impl, task.routing = self.impl, self.routing
        task.balancer, task.selection_bias = self.balancer, self.balancer != "none"

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
            estimator, losses = pretrain_recipe(self.routing)
            self.pretrain_cost = progress.price(("pretrain", key), task, [estimator],
                                                losses=losses, diag=False,
                                                diag_samples=1, tau=self.tau)[estimator]
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
        if not costs or not self.cls.has_truth or self.na:
            return 0.0
        ckpts = 1 + (len(self.checkpoint_steps()) - 1) * len(self.fidelity_names())
        return ckpts * sum(costs[n]["diag"] for n in self.names) * len(FIDELITY_TAUS)
