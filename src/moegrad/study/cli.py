"""Train the same small MoE model with each router gradient estimator and several seeds, under
equal step and wall-clock budgets, and write a report that says which estimator to use.

Output directory (``--out``, default ``study-<task>``):
  report.md      tables and conclusions computed from the numbers
  metrics.json   the cell's settings; per estimator: final loss, purity, dead experts, load CV,
                 max violation, router entropy, gradient cosines (vs the exact expected-loss
                 gradient under the estimator's own forward weights, per sample and of the mean
                 of --diag-samples samples, and vs the dense-mixture gradient), gradient
                 variance, FLOPs per step, median time per step, loss at equal wall-clock time,
                 steps to a target loss; plus every run's full history and settings
  *.png          loss vs step and vs training time, load per expert, gradient cosine, purity

Tasks: ``clusters`` (default; C Gaussian clusters with one teacher map each, ground-truth
routing known, top-1 routing) and ``charlm`` (a tiny character-level transformer LM trained
on CPython's pydoc help topics; validation loss and bits per character). Nothing is
downloaded. ``--quick`` (8 estimators x 2 seeds x 800 steps) takes well under a minute on 2
CPU cores; the default run is 5 seeds x 3000 steps.

Settings (recorded in every run's ``settings``): --top-k, --experts, --losses, --router-init,
--lr, the task's knobs (clusters: --clusters, --dim; charlm: --layers, --width) and --regime.
Unset options keep the task's defaults (clusters: top-1, 8 experts, zero router, no loss).

Regimes: ``scratch`` (default) trains from initialisation. ``finetune`` pretrains the model
once per seed with topk + switch loss 0.01 on the task's distribution (--pretrain-steps),
then fine-tunes a copy with each estimator on a shifted distribution (clusters: centres moved
and teachers changed by 45 degrees; charlm: standard-library source code instead of the help
topics) and reports the held-out loss before and after and the routing drift.

Grid: --grid KEY=V1,V2 [KEY=V1,V2 ...] runs the cross product of the values, each cell in
its own subdirectory of --out named from its values (e.g. k2_switch0.01), then a summary over
the cells. Keys: top_k, experts, losses, router_init, lr, regime, task. A losses value is
"none" or NAME=COEF terms joined by "+" (commas separate the grid's values), e.g.
  --grid top_k=1,2 losses=none,switch=0.01,switch=0.01+z_loss=0.001
A key given in --grid cannot also be given as its own option.

examples:
  moegrad study --quick
  moegrad study --task charlm --estimators topk,dense,default_moe --seeds 2
  moegrad study --estimators topk,dense --losses switch=0.01 --top-k 2 --out study-switch
  moegrad study --quick --grid top_k=1,2 losses=none,switch=0.01 --out study-grid
  moegrad study --quick --regime finetune --estimators topk,dense
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import math
import shlex
import sys
import warnings
from pathlib import Path
from typing import Optional

from moegrad import estimators as registry

#: grid keys, in the order cell names list them
GRID_KEYS = ("task", "regime", "top_k", "experts", "losses", "router_init", "lr")
#: trajectories whose checkpoints (steps 0, 1/4, 1/2, end of seed 0) every estimator's router
#: gradient is measured on (moegrad.study.fidelity.shared_checkpoint_fidelity)
FIDELITY_TRAJECTORIES = ("topk", "dense")


# ----------------------------------------------------------------------------- parsing
def _estimators(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--estimators needs at least one name")
    for n in names:
        if n not in registry.available():
            raise argparse.ArgumentTypeError(
                f"unknown estimator {n!r}; choose from {','.join(registry.available())}")
    return names


def _loss_set(text: str, sep: str = ",") -> dict:
    """'none' or NAME=COEF terms joined by ``sep`` (and always by '+') -> {name: coef}."""
    from moegrad.losses import available

    if text.strip().lower() in ("", "none"):
        return {}
    out = {}
    for part in text.replace("+", sep).split(sep):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in available():
            raise argparse.ArgumentTypeError(
                f"losses expect name=coefficient pairs with names from {available()} (or "
                f"'none'), got {part!r}")
        try:
            coef = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"coefficient of {name!r} must be a number, got {value!r}") from None
        if not math.isfinite(coef) or coef < 0:
            raise argparse.ArgumentTypeError(
                f"coefficient of {name!r} must be a finite number >= 0, got {value!r}")
        if name in out:
            raise argparse.ArgumentTypeError(f"loss {name!r} is given twice in {text!r}")
        out[name] = coef
    return out


def _losses(text: str) -> dict:
    return _loss_set(text, ",")


def _int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _int(text, 1)


def _nonnegative_int(text: str) -> int:
    return _int(text, 0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _choice(allowed):
    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(allowed)}")
        return text
    return parse


def _grid_parsers() -> dict:
    from moegrad.study.tasks import REGIMES, ROUTER_INITS, TASKS, get_task

    get_task("clusters")  # registers every task
    return {"top_k": _positive_int, "experts": _positive_int,
            "losses": lambda v: _loss_set(v, "+"), "router_init": _choice(ROUTER_INITS),
            "lr": _positive_float, "regime": _choice(REGIMES), "task": _choice(sorted(TASKS))}


def _grid_item(text: str) -> tuple:
    """KEY=V1,V2,... -> (key, [parsed values])."""
    key, eq, rest = text.partition("=")
    parsers = _grid_parsers()
    if not eq or key not in parsers:
        raise argparse.ArgumentTypeError(
            f"grid items are KEY=V1,V2,... with KEY one of {', '.join(GRID_KEYS)}; got {text!r}")
    raw = [v.strip() for v in rest.split(",")]
    if not rest.strip() or any(not v for v in raw):
        raise argparse.ArgumentTypeError(f"grid item {text!r} has an empty value")
    values = []
    for v in raw:
        try:
            parsed = parsers[key](v)
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{key} value {v!r}: {err}") from None
        if parsed in values:
            raise argparse.ArgumentTypeError(f"grid item {text!r} repeats the value {v!r}")
        values.append(parsed)
    return key, values


class _GridAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        grid = dict(getattr(namespace, self.dest, None) or {})
        for key, vals in values:
            if key in grid:
                parser.error(f"argument --grid: key {key!r} is given twice")
            grid[key] = vals
        setattr(namespace, self.dest, grid)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moegrad.experts import IMPLS
    from moegrad.study.tasks import REGIMES, ROUTER_INITS, TASKS, get_task

    get_task("clusters")  # registers every task
    parser.add_argument("--task", default="clusters", choices=sorted(TASKS),
                        help="what to train on (default: clusters)")
    parser.add_argument("--estimators", type=_estimators, default=None, metavar="A,B,...",
                        help="comma-separated estimators to compare (default: all of "
                             f"{','.join(registry.available())})")
    parser.add_argument("--quick", action="store_true",
                        help="the short budget (clusters: 800 steps x 2 seeds; charlm: 100 x 2); "
                             "the report says how many seeds it used")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help="step budget per run (default: the task's, see --quick)")
    parser.add_argument("--seeds", type=_positive_int, default=None,
                        help="number of seeds per estimator, 0..N-1 (default: the task's, 5 for "
                             "the full run)")
    parser.add_argument("--time-budget", type=_positive_float, default=None, metavar="SECONDS",
                        help="wall-clock budget per run in seconds of training time; a run stops "
                             "at --steps or at this time, whichever comes first, and is then "
                             "flagged time_limited; > 0 (default: 300, or 60 with --quick)")
    parser.add_argument("--losses", type=_losses, default=None, metavar="NAME=COEF,...",
                        help="balance losses added to every run, e.g. switch=0.01,z_loss=0.001 "
                             "(default: none, so only the task gradient trains the router)")
    parser.add_argument("--top-k", type=_positive_int, default=None, metavar="K",
                        help="experts per token, 1 <= K <= --experts (default: the task's; "
                             "clusters 1, charlm 2)")
    parser.add_argument("--experts", type=_positive_int, default=None, metavar="E",
                        help="experts per MoE layer, >= 1 and, for clusters, >= --clusters "
                             "(default 8)")
    parser.add_argument("--router-init", type=_choice(ROUTER_INITS), default=None,
                        metavar="{" + ",".join(ROUTER_INITS) + "}",
                        help="initial router weights: zero (every expert scores the same), "
                             "normal (N(0, 0.02^2), Hugging Face's initializer_range) or uniform "
                             "(nn.Linear's default); default: clusters zero, charlm uniform")
    parser.add_argument("--lr", type=_positive_float, default=None,
                        help="Adam learning rate, > 0 (default: the task's, 0.003)")
    parser.add_argument("--clusters", type=_positive_int, default=None, metavar="C",
                        help="clusters task: number of clusters, >= 1 (default 4)")
    parser.add_argument("--dim", type=_positive_int, default=None, metavar="D",
                        help="clusters task: input/model dimension, >= 1 (default 16)")
    parser.add_argument("--layers", type=_positive_int, default=None, metavar="L",
                        help="charlm task: transformer blocks, >= 1 (default 2)")
    parser.add_argument("--width", type=_positive_int, default=None, metavar="D",
                        help="charlm task: model and expert hidden width, a multiple of its 4 "
                             "attention heads (default 48)")
    parser.add_argument("--regime", type=_choice(REGIMES), default=None,
                        metavar="{" + ",".join(REGIMES) + "}",
                        help="scratch (default) or finetune: pretrain with topk + switch=0.01 "
                             "once per seed, then fine-tune with each estimator on a shifted "
                             "distribution; reports loss before/after and routing drift")
    parser.add_argument("--pretrain-steps", type=_positive_int, default=None,
                        help="finetune regime: pretraining steps (default: --steps)")
    parser.add_argument("--grid", nargs="+", type=_grid_item, action=_GridAction, default=None,
                        metavar="KEY=V1,V2",
                        help="run the cross product of the values, one subdirectory of --out per "
                             f"cell; keys: {', '.join(GRID_KEYS)}. losses values: 'none' or "
                             "NAME=COEF terms joined by '+', e.g. losses=none,switch=0.01,"
                             "switch=0.01+z_loss=0.001")
    parser.add_argument("--flops-budget", type=_positive_float, default=None, metavar="FLOPS",
                        help="training FLOPs at which the report compares losses (loss at equal "
                             "FLOPs; FLOPs per step are counted from what each step evaluated: "
                             "routed pairs, plus the unselected pairs of dense); > 0 (default: "
                             "the smallest total of the runs)")
    parser.add_argument("--eval-every", type=_positive_int, default=None,
                        help="evaluate every N steps (default: steps / 20)")
    parser.add_argument("--diag-every", type=_nonnegative_int, default=None,
                        help="gradient diagnostics every N steps, 0 to skip (default: steps / 5; "
                             "only tasks with an enumerable exact gradient, i.e. clusters)")
    parser.add_argument("--diag-samples", type=_positive_int, default=8,
                        help="gradient samples per diagnostic for stochastic estimators (default 8)")
    parser.add_argument("--tau", type=_positive_float, default=1.0,
                        help="temperature of the sampled top-k policy whose expected loss defines "
                             "the exact reference gradient; > 0 (default 1.0)")
    parser.add_argument("--impl", default="auto", choices=list(IMPLS),
                        help="expert compute backend of every MoE layer (moegrad.experts.IMPLS; "
                             "default auto). It changes speed, not the maths")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: study-<task>, or study-grid when the "
                             "grid varies the task)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


# ----------------------------------------------------------------------------- settings
#: task -> {option name (run_study keyword): the task constructor's argument}
TASK_KNOBS = {"clusters": {"top_k": "top_k", "experts": "num_experts", "router_init": "router_init",
                           "lr": "lr", "clusters": "num_classes", "dim": "dim"},
              "charlm": {"top_k": "top_k", "experts": "num_experts", "router_init": "router_init",
                         "lr": "lr", "layers": "layers", "width": "dim"}}
_FLAGS = {"top_k": "--top-k", "experts": "--experts", "router_init": "--router-init",
          "lr": "--lr", "clusters": "--clusters", "dim": "--dim", "layers": "--layers",
          "width": "--width"}


def task_kwargs(task_name: str, options: dict) -> dict:
    """Options of run_study (``top_k``, ``experts``, ``router_init``, ``lr``, ``clusters``,
    ``dim``, ``layers``, ``width``; None = the task's default) -> the task constructor's
    keyword arguments, checked: ValueError naming the command-line option and what is allowed."""
    from moegrad.study.tasks import get_task

    cls = get_task(task_name)
    knobs = TASK_KNOBS.get(task_name, {})
    for key, value in options.items():
        if value is not None and key not in knobs:
            applies = [t for t, k in TASK_KNOBS.items() if key in k]
            raise ValueError(f"{_FLAGS[key]} applies to --task {' or '.join(applies)} only, "
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


def cell_name(cell: dict) -> str:
    """A short directory name from a grid cell's values, e.g. ``k2_e16_switch0.01``."""
    parts = []
    for key in GRID_KEYS:
        if key not in cell:
            continue
        v = cell[key]
        if key == "top_k":
            parts.append(f"k{v}")
        elif key == "experts":
            parts.append(f"e{v}")
        elif key == "losses":
            parts.append("+".join(f"{n}{c:g}" for n, c in v.items()) or "noloss")
        elif key == "router_init":
            parts.append(f"init-{v}")
        elif key == "lr":
            parts.append(f"lr{v:g}")
        else:
            parts.append(str(v))
    return "_".join(parts) or "default"


# ----------------------------------------------------------------------------- progress
class Progress:
    """A tqdm bar over the estimated seconds of the whole study (or grid).

    tqdm's own ETA divides the steps left by the recent step rate; in a study the runs differ
    in speed (``dense`` costs more per step than ``topk``, evaluations and gradient diagnostics
    come in bursts, charlm is slower than clusters), so that estimate is wrong at the start
    and jumps between runs. Instead every run is priced before training from a short warm-up
    (:func:`moegrad.study.train.time_costs`: 3 timed steps, one evaluation, one diagnostic per
    estimator on a throwaway model), the bar's total is the sum of those prices in seconds,
    each step advances it by its run's price per step (evaluations and diagnostics spread
    over the steps), and tqdm's rate is the average since the start (smoothing 0), so the ETA
    is sensible from the first steps and corrects itself if the machine is busier than during
    the warm-up. The postfix shows the current run and the steps done.
    """

    def __init__(self, enabled: bool, desc: str) -> None:
        self.enabled, self.desc = enabled, desc
        self.total, self.bar, self.steps_total, self.steps_done = 0.0, None, 0, 0
        self._costs: dict = {}

    def price(self, key, task, names, *, losses, diag: bool, diag_samples: int, tau: float) -> dict:
        """Measure (once per key) the time costs of each estimator on ``task``."""
        from moegrad.study.train import time_costs

        if not self.enabled:
            return {}
        if key not in self._costs:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "estimator=.* gives the router no task gradient",
                                        UserWarning)
                self._costs[key] = {n: time_costs(task, n, losses=losses, diag=diag,
                                                  diag_samples=diag_samples, tau=tau)
                                    for n in names}
        return self._costs[key]

    def add(self, seconds: float, steps: int = 0) -> None:
        self.total += seconds
        self.steps_total += steps

    def start(self) -> None:
        if self.enabled and self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max(self.total, 1e-9), smoothing=0.0, file=sys.stderr,
                            desc=self.desc, bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                            "[{elapsed}<{remaining}]{postfix}")

    def run(self, label: str, steps: int, seconds: float):
        """-> (on_step callback, finish callback) for one run priced ``seconds``."""
        per_step = seconds / max(steps, 1)
        state = {"done": 0.0}

        def on_step() -> None:
            self.steps_done += 1
            state["done"] += per_step
            if self.bar is not None:
                self._advance(per_step)
                if self.steps_done % 50 == 0:
                    self.bar.set_postfix_str(f"{label}, step {self.steps_done}/{self.steps_total}",
                                             refresh=False)

        def finish(steps_run: int = steps) -> None:
            self.steps_done += steps - steps_run  # steps a time-limited run did not take
            if self.bar is not None:
                self._advance(seconds - state["done"])

        if self.bar is not None:
            self.bar.set_postfix_str(f"{label}, step {self.steps_done}/{self.steps_total}")
        return on_step, finish

    def _advance(self, seconds: float) -> None:
        """Move the bar by ``seconds`` of priced work, never past its total (float sums of the
        per-step shares can overshoot it by rounding, which tqdm shows as a negative ETA)."""
        seconds = min(seconds, self.bar.total - self.bar.n)
        if seconds > 0:
            self.bar.update(seconds)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run_seconds(cost: dict, steps: int, eval_every: int, diag_every: int) -> float:
    if not cost:
        return float(steps)
    evals = steps // eval_every + 2
    diags = (steps // diag_every + 2) if diag_every else 0
    return steps * cost["step"] + evals * cost["eval"] + diags * cost["diag"]


# ----------------------------------------------------------------------------- the study
class _Cell:
    """Everything run_study resolved for one cell (defaults applied, checked)."""

    def __init__(self, task_name, names, *, quick, steps, seeds, time_budget, losses, eval_every,
                 diag_every, diag_samples, tau, impl, regime, pretrain_steps, options,
                 flops_budget=None) -> None:
        from moegrad.experts import IMPLS
        from moegrad.study.tasks import REGIMES, get_task

        self.cls = get_task(task_name)
        self.task_name = task_name
        self.names = list(names or registry.available())
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
        task.impl = self.impl
        return task

    def fidelity_names(self) -> list:
        return [n for n in FIDELITY_TRAJECTORIES if n in self.names] or self.names[:1]

    def checkpoint_steps(self) -> tuple:
        from moegrad.study.train import END

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
                progress.add(_run_seconds(self.pretrain_cost, self.pretrain_steps,
                                          self.eval_every, 0), self.pretrain_steps)
            for n in self.names:
                progress.add(self.run_seconds(n), self.steps)
        progress.add(self.fidelity_seconds())

    def run_seconds(self, name: str) -> float:
        return _run_seconds(getattr(self, "costs", {}).get(name, {}), self.steps,
                            self.eval_every, self.diag_every)

    def fidelity_seconds(self) -> float:
        """Estimated cost of the shared-checkpoint fidelity (0 for tasks without a probe)."""
        costs = getattr(self, "costs", {})
        if not costs or not self.cls.has_truth:
            return 0.0
        ckpts = 1 + (len(self.checkpoint_steps()) - 1) * len(self.fidelity_names())
        return ckpts * sum(costs[n]["diag"] for n in self.names) * len(FIDELITY_TAUS)


#: temperatures of the exact reference in the shared-checkpoint fidelity (a tau sweep)
FIDELITY_TAUS = (0.5, 1.0, 2.0)


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
              fidelity: bool = True) -> dict:
    """Run a study (one cell) and write its directory; returns the metrics.json document.

    ``top_k`` ... ``width`` set the task (None: the task's default, see :data:`TASK_KNOBS`);
    ``regime`` "scratch" or "finetune"; ``progress``: True/False or a :class:`Progress`
    shared by the cells of a grid; ``fidelity``: measure every estimator's router gradient on
    shared checkpoints of seed 0 (tasks with a probe). Raises ValueError on bad settings
    before training anything.
    """
    options = {"top_k": top_k, "experts": experts, "router_init": router_init, "lr": lr,
               "clusters": clusters, "dim": dim, "layers": layers, "width": width}
    spec = _Cell(task_name, estimators, quick=quick, steps=steps, seeds=seeds,
                 time_budget=time_budget, losses=losses, eval_every=eval_every,
                 diag_every=diag_every, diag_samples=diag_samples, tau=tau, impl=impl,
                 regime=regime, pretrain_steps=pretrain_steps, options=options,
                 flops_budget=flops_budget)
    out = Path(out or f"study-{task_name}")
    own = not isinstance(progress, Progress)
    bar = Progress(bool(progress), f"study {task_name}") if own else progress
    if own:
        spec.price(bar, "cell")
        bar.start()
    doc = _run_cell(spec, out, command, bar, cell, fidelity)
    if own:
        bar.close()
    return doc


def _run_cell(spec: _Cell, out: Path, command: str, bar: Progress, cell: Optional[str],
              fidelity: bool) -> dict:
    from moegrad.study.plots import write_plots
    from moegrad.study.report import aggregate, write_report
    from moegrad.study.train import pretrain, state_copy, train_run

    out.mkdir(parents=True, exist_ok=True)
    runs, pretrained, checkpoints, fid_task = [], [], [], None
    for seed in range(spec.seeds):
        task = spec.task(seed)
        init_state, info = None, None
        if spec.regime == "finetune":
            seconds = _run_seconds(getattr(spec, "pretrain_cost", {}), spec.pretrain_steps,
                                   spec.eval_every, 0)
            on_step, finish = bar.run(f"pretrain topk seed {seed}", spec.pretrain_steps, seconds)
            init_state, info = pretrain(task, seed, steps=spec.pretrain_steps,
                                        time_budget=spec.time_budget, eval_every=spec.eval_every,
                                        on_step=on_step)
            finish(info["steps"])
            pretrained.append(info)
            task = task.shifted()
            task.impl = spec.impl
        if seed == 0:
            fid_task = task
        for name in spec.names:
            keep = (seed == 0 and fidelity and spec.cls.has_truth
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
            "cell": cell or "default"}
    if spec.flops_budget is not None:
        args["flops_budget"] = spec.flops_budget
    if spec.regime == "finetune":
        args["pretrain_steps"] = spec.pretrain_steps
    doc = aggregate(runs, fid_task, args)
    doc.setdefault("settings", runs[0]["settings"])
    doc.setdefault("cell", cell or "default")
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


def _shared_fidelity(task, checkpoints: list, spec: _Cell) -> Optional[dict]:
    """moegrad.study.fidelity.shared_checkpoint_fidelity on seed 0's checkpoints."""
    try:
        from moegrad.study.fidelity import shared_checkpoint_fidelity
    except ImportError:
        print("moegrad study: moegrad.study.fidelity.shared_checkpoint_fidelity is not available "
              "in this version; no shared-checkpoint fidelity in metrics.json", file=sys.stderr)
        return None
    taus = tuple(sorted(set(FIDELITY_TAUS) | {spec.tau}))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "estimator=.* gives the router no task gradient",
                                UserWarning)
        return shared_checkpoint_fidelity(task, checkpoints, spec.names, taus=taus,
                                          samples=spec.diag_samples, seed=0)


# ----------------------------------------------------------------------------- the grid
def grid_cells(grid: dict) -> list[dict]:
    """{key: [values]} -> the cross product as a list of {key: value} (keys in grid order)."""
    for key in grid:
        if key not in GRID_KEYS:
            raise ValueError(f"grid key {key!r} is unknown; choose from {list(GRID_KEYS)}")
        if not grid[key]:
            raise ValueError(f"grid key {key!r} has no values")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def run_grid(grid: dict, *, out: Path, command: str = "moegrad study",
             cell_commands: Optional[dict] = None, progress: bool = True, **study) -> list[dict]:
    """Run :func:`run_study` for every cell of ``grid`` ({key: [values]}, keys from
    :data:`GRID_KEYS`) into ``out/<cell name>`` and write the grid summary
    (``moegrad.study.report.write_grid_summary``). ``study`` holds run_study's other keywords
    (the base every cell starts from; a key of the grid must not be among them). Every cell is
    checked before anything trains. Returns the per-cell documents."""
    names = {"top_k": "top_k", "experts": "experts", "losses": "losses",
             "router_init": "router_init", "lr": "lr", "regime": "regime", "task": "task_name"}
    for key in grid:
        if study.get(names.get(key, key)) is not None and key != "task":
            raise ValueError(f"{key} is both in the grid and given as its own option "
                             f"({_FLAGS.get(key, '--' + key.replace('_', '-'))}); give it once")
    out = Path(out)
    cells = grid_cells(grid)
    bar = Progress(progress, "study grid")
    plans = []
    for cell in cells:
        kwargs = dict(study)
        for key, value in cell.items():
            kwargs[names[key]] = value
        task_name = kwargs.pop("task_name", "clusters")
        options = {k: kwargs.pop(k, None) for k in ("top_k", "experts", "router_init", "lr",
                                                    "clusters", "dim", "layers", "width")}
        if len({c.get("task") for c in cells}) > 1:  # a knob of the other task: not this cell's
            knobs = TASK_KNOBS[task_name]
            options = {k: (v if k in knobs else None) for k, v in options.items()}
        spec = _Cell(task_name, kwargs.pop("estimators", None), quick=kwargs.pop("quick", False),
                     steps=kwargs.pop("steps", None), seeds=kwargs.pop("seeds", None),
                     time_budget=kwargs.pop("time_budget", None),
                     losses=kwargs.pop("losses", None), eval_every=kwargs.pop("eval_every", None),
                     diag_every=kwargs.pop("diag_every", None),
                     diag_samples=kwargs.pop("diag_samples", 8), tau=kwargs.pop("tau", 1.0),
                     impl=kwargs.pop("impl", "auto"), regime=kwargs.pop("regime", None),
                     pretrain_steps=kwargs.pop("pretrain_steps", None), options=options,
                     flops_budget=kwargs.pop("flops_budget", None))
        fidelity = kwargs.pop("fidelity", True)
        if kwargs:
            raise TypeError(f"run_grid got unexpected keywords {sorted(kwargs)}")
        plans.append((cell, cell_name(cell), spec, fidelity))
    if len({name for _, name, _, _ in plans}) != len(plans):
        raise ValueError("two grid cells have the same name; make the grid values distinct")
    for cell, name, spec, _ in plans:
        spec.price(bar, name)
    bar.start()
    docs = []
    for cell, name, spec, fidelity in plans:
        cmd = (cell_commands or {}).get(name, f"{command}  # grid cell {name}")
        docs.append(_run_cell(spec, out / name, cmd, bar, name, fidelity))
    bar.close()
    try:
        from moegrad.study.report import write_grid_summary
    except ImportError:
        print("moegrad study: this version of moegrad.study.report has no write_grid_summary; "
              f"wrote the {len(docs)} cells but no summary.md/summary.png", file=sys.stderr)
    else:
        write_grid_summary(docs, out, command)
    return docs


def _cell_commands(argv: list, cells: list, out: Path) -> dict:
    """The command that reproduces each grid cell alone: argv without --grid and --out, plus
    the cell's values as options and --out <out>/<cell>."""
    base = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--grid" or a.startswith("--grid="):
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                i += 1
            continue
        if a == "--out":
            i += 2
            continue
        if a.startswith("--out="):
            i += 1
            continue
        base.append(a)
        i += 1
    result = {}
    knob_task = {_FLAGS[k]: t for t, knobs in TASK_KNOBS.items() for k in knobs
                 if k not in ("top_k", "experts", "router_init", "lr")}
    for cell in cells:
        mine, j = [], 0
        while j < len(base):  # leave out the other task's knobs (--width for a clusters cell)
            flag = base[j].split("=", 1)[0]
            if "task" in cell and knob_task.get(flag, cell["task"]) != cell["task"]:
                j += 1 if "=" in base[j] else 2
                continue
            mine.append(base[j])
            j += 1
        extra = []
        for key, v in cell.items():
            flag = {"task": "--task", "regime": "--regime"}.get(key, _FLAGS.get(key, "--losses"))
            if key == "losses":
                v = ",".join(f"{n}={c:g}" for n, c in v.items()) or "none"
            extra += [flag, str(v)]
        name = cell_name(cell)
        result[name] = "moegrad study " + " ".join(
            shlex.quote(a) for a in mine + extra + ["--out", str(out / name)])
    return result


# ----------------------------------------------------------------------------- the command
def run(args: argparse.Namespace) -> int:
    argv = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "study" else []
    command = ("moegrad study " + " ".join(shlex.quote(a) for a in argv)).strip()
    common = dict(quick=args.quick, steps=args.steps, seeds=args.seeds,
                  time_budget=args.time_budget, eval_every=args.eval_every,
                  diag_every=args.diag_every, diag_samples=args.diag_samples, tau=args.tau,
                  impl=args.impl, estimators=args.estimators, clusters=args.clusters,
                  dim=args.dim, layers=args.layers, width=args.width,
                  pretrain_steps=args.pretrain_steps, flops_budget=args.flops_budget)
    cells = {"top_k": args.top_k, "experts": args.experts, "losses": args.losses,
             "router_init": args.router_init, "lr": args.lr, "regime": args.regime}
    try:
        if args.grid:
            grid = dict(args.grid)
            given = [k for k in grid if k != "task" and cells.get(k) is not None]
            if "task" in grid and "--task" in " ".join(argv).split():
                given.append("task")
            if given:
                raise ValueError(f"{_FLAGS.get(given[0], '--' + given[0].replace('_', '-'))} is "
                                 f"also a --grid key ({given[0]}); give it in one place only")
            out = args.out or Path("study-grid" if "task" in grid else f"study-{args.task}")
            if "task" not in grid:
                common["task_name"] = args.task
            base = {k: v for k, v in cells.items() if v is not None}
            docs = run_grid(grid, out=out, command=command,
                            cell_commands=_cell_commands(argv, grid_cells(grid), out),
                            progress=not args.no_progress, **common, **base)
            print(f"wrote {len(docs)} cells under {out}/ (one report.md and metrics.json each)")
            for doc in docs:
                _print_summary(doc, indent="    ", title=f"  {doc.get('cell')}:")
            return 0
        out = args.out or Path(f"study-{args.task}")
        doc = run_study(args.task, out=out, progress=not args.no_progress, command=command,
                        **{k: v for k, v in common.items() if k != "estimators"},
                        estimators=args.estimators, **{k: v for k, v in cells.items()
                                                       if k != "regime"},
                        regime=args.regime or "scratch")
    except ValueError as err:
        print(f"moegrad study: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}/report.md, {out}/metrics.json and plots")
    _print_summary(doc)
    return 0


def _print_summary(doc: dict, indent: str = "  ", title: Optional[str] = None) -> None:
    a = doc["args"]
    if title:
        print(title)
    if a.get("quick"):
        print(f"{indent}--quick: {a['seeds']} seed(s) per estimator, {a['steps']} steps "
              "(use --seeds N for more; the full run uses 5)")
    limited = [f"{r['estimator']} seed {r['seed']}" for r in doc["runs"] if r.get("time_limited")]
    if limited:
        print(f"{indent}stopped by --time-budget before --steps: {', '.join(limited)}")
    per = doc["estimators"]
    for name in sorted(per):  # not ranked: the verdicts (paired tests) are in report.md
        stat = per[name]["final_loss"]
        spread = f" ± {stat['sd']:.4f}" if stat.get("sd") is not None and stat["n"] > 1 else ""
        print(f"{indent}{name:18s} final val loss {stat['mean']:.4f}{spread} (n = {stat['n']})")
    print(f"{indent}verdicts from paired tests against topk: report.md")
