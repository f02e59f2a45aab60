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
--lr, --routing, --balancer, the task's knobs (clusters: --clusters, --dim; charlm: --layers,
--width) and --regime. ``--routing`` sets every MoE layer's ``routing=``: ``sinkhorn``
(training selection on Sinkhorn-balanced scores) runs the deterministic estimators only;
``expert_choice`` (each expert takes its top tokens) runs ``topk`` only; ``remoe`` (ReLU gates)
takes no estimator and its runs are named ``remoe``. Under those two a token gets 0..E experts:
load and dead experts count the chosen pairs, purity reads each token's highest-score chosen
expert (a token no expert took counts as impure), ``active_experts`` is the mean number of
experts per token (K under token choice), the balance losses are z_loss only and the gradient
diagnostics, shared-checkpoint fidelity and fine-tuning drift are n/a (they enumerate top-k
subsets). ``--balancer bias|quantile`` builds the layers with ``selection_bias=True`` and
steps a BiasBalancer / QuantileBalancer after every optimizer step (routing topk and the
deterministic estimators only).
Unset options keep the task's defaults (clusters: top-1, 8 experts, zero router, no loss).

Regimes: ``scratch`` (default) trains from initialisation. ``finetune`` pretrains the model
once per seed with topk + switch loss 0.01 on the task's distribution (--pretrain-steps),
then fine-tunes a copy with each estimator on a shifted distribution (clusters: centres moved
and teachers changed by 45 degrees; charlm: standard-library source code instead of the help
topics) and reports the held-out loss before and after and the routing drift.

Grid: --grid KEY=V1,V2 [KEY=V1,V2 ...] runs the cross product of the values, each cell in
its own subdirectory of --out named from its values (e.g. k2_switch0.01), then a summary over
the cells. Keys: top_k, experts, losses, router_init, lr, regime, routing, balancer, task. A losses
value is
"none" or NAME=COEF terms joined by "+" (commas separate the grid's values), e.g.
  --grid top_k=1,2 losses=none,switch=0.01,switch=0.01+z_loss=0.001
A key given in --grid cannot also be given as its own option.

examples:
  moegrad study --quick
  moegrad study --task charlm --estimators topk,dense,default_moe --seeds 2
  moegrad study --estimators topk,dense --losses switch=0.01 --top-k 2 --out study-switch
  moegrad study --quick --grid top_k=1,2 losses=none,switch=0.01 --out study-grid
  moegrad study --quick --regime finetune --estimators topk,dense
  moegrad study --quick --routing sinkhorn
  moegrad study --quick --estimators topk,dense --grid routing=topk,sinkhorn
  moegrad study --quick --grid routing=topk,sinkhorn,expert_choice,remoe
  moegrad study --quick --estimators topk,dense --grid balancer=none,bias,quantile
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Optional

# the parser needs no torch (``moegrad study --help`` loads none): its choices come from
# moegrad._spec and moegrad.study.options; the modules that train are imported by run()
from moegrad._spec import estimator_names as available_estimators
from moegrad._spec import loss_names as available_losses
from moegrad.study.grid import GRID_KEYS, cell_name, grid_cells
from moegrad.study.options import (BALANCERS, FIDELITY_TAUS, FIDELITY_TRAJECTORIES, FLAGS, IMPLS,
                                   NO_ESTIMATOR, REGIMES, ROUTER_INITS, ROUTINGS, TASK_KNOBS,
                                   TASK_NAMES)

#: the names this module had before its split; those defined elsewhere stay importable from here
#: (run_study, run_grid, Progress and task_kwargs through :func:`__getattr__`, like :func:`run`
#: imports them)
__all__ = ["add_arguments", "run", "GRID_KEYS", "grid_cells", "cell_name",  # noqa: F822
           "Progress", "TASK_KNOBS", "task_kwargs", "FIDELITY_TAUS",  # noqa: F822
           "FIDELITY_TRAJECTORIES", "run_study", "run_grid"]  # noqa: F822 (from __getattr__)


# ----------------------------------------------------------------------------- parsing
def _estimators(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--estimators needs at least one name")
    for n in names:
        if n not in available_estimators():
            raise argparse.ArgumentTypeError(
                f"unknown estimator {n!r}; choose from {','.join(available_estimators())}")
    return names


def _loss_set(text: str, sep: str = ",") -> dict:
    """'none' or NAME=COEF terms joined by ``sep`` (and always by '+') -> {name: coef}."""
    if text.strip().lower() in ("", "none"):
        return {}
    out = {}
    for part in text.replace("+", sep).split(sep):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in available_losses():
            raise argparse.ArgumentTypeError(
                f"losses expect name=coefficient pairs with names from {available_losses()} (or "
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
    return {"top_k": _positive_int, "experts": _positive_int,
            "losses": lambda v: _loss_set(v, "+"), "router_init": _choice(ROUTER_INITS),
            "lr": _positive_float, "regime": _choice(REGIMES), "task": _choice(TASK_NAMES),
            "routing": _choice(ROUTINGS), "balancer": _choice(BALANCERS)}


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
    parser.add_argument("--task", default="clusters", choices=list(TASK_NAMES),
                        help="what to train on (default: clusters)")
    parser.add_argument("--estimators", type=_estimators, default=None, metavar="A,B,...",
                        help="comma-separated estimators to compare (default: all of "
                             f"{','.join(available_estimators())}; --routing expert_choice: topk only; "
                             f"--routing remoe takes none, its runs are named {NO_ESTIMATOR!r})")
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
    parser.add_argument("--routing", type=_choice(ROUTINGS), default=None,
                        metavar="{" + ",".join(ROUTINGS) + "}",
                        help="routing= of every MoE layer (pretraining included): topk (default), "
                             "sinkhorn (training-mode top-k of the Sinkhorn-balanced scores, "
                             "Megatron-Core's sinkhorn; deterministic estimators only), "
                             "expert_choice (each expert takes its top tokens; estimator topk "
                             "only) or remoe (ReLU gates, no estimator: its runs are named "
                             "'remoe', --estimators is refused); expert_choice and remoe take "
                             "the loss z_loss only and have no gradient diagnostics (n/a)")
    parser.add_argument("--balancer", type=_choice(BALANCERS), default=None,
                        metavar="{" + ",".join(BALANCERS) + "}",
                        help="none (default), bias (moegrad.BiasBalancer, DeepSeek-V3's "
                             "auxiliary-loss-free bias) or quantile (moegrad.QuantileBalancer): "
                             "builds the layers with selection_bias=True and steps the balancer "
                             "after every optimizer step; --routing topk and deterministic "
                             "estimators only")
    parser.add_argument("--pretrain-steps", type=_positive_int, default=None,
                        help="finetune regime: pretraining steps (default: --steps)")
    parser.add_argument("--grid", nargs="+", type=_grid_item, action=_GridAction, default=None,
                        metavar="KEY=V1,V2",
                        help="run the cross product of the values, one subdirectory of --out per "
                             f"cell; keys: {', '.join(GRID_KEYS)}. losses values: 'none' or "
                             "NAME=COEF terms joined by '+', e.g. losses=none,switch=0.01,"
                             "switch=0.01+z_loss=0.001; routing=topk,sinkhorn,expert_choice,remoe "
                             "compares the routing methods, balancer=none,bias,quantile the "
                             "balancers")
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


# ----------------------------------------------------------------------------- the command
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
    knob_task = {FLAGS[k]: t for t, knobs in TASK_KNOBS.items() for k in knobs
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
            flag = {"task": "--task", "regime": "--regime",
                    "routing": "--routing"}.get(key, FLAGS.get(key, "--losses"))
            if key == "losses":
                v = ",".join(f"{n}={c:g}" for n, c in v.items()) or "none"
            extra += [flag, str(v)]
        name = cell_name(cell)
        result[name] = "moegrad study " + " ".join(
            shlex.quote(a) for a in mine + extra + ["--out", str(out / name)])
    return result


def run(args: argparse.Namespace) -> int:
    """``moegrad study``: run the study (or the grid) the parsed ``args`` describe."""
    # imported here, not at the top: the runners write the plots, so they import matplotlib
    # (about 0.8 s), which ``moegrad --help`` and ``moegrad study --help`` (this module's
    # add_arguments) must not pay, and which is an optional dependency (the ``study`` extra)
    from moegrad.study.grid_runner import run_grid
    from moegrad.study.runner import run_study

    argv = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "study" else []
    command = ("moegrad study " + " ".join(shlex.quote(a) for a in argv)).strip()
    common = dict(quick=args.quick, steps=args.steps, seeds=args.seeds,
                  time_budget=args.time_budget, eval_every=args.eval_every,
                  diag_every=args.diag_every, diag_samples=args.diag_samples, tau=args.tau,
                  impl=args.impl, estimators=args.estimators, clusters=args.clusters,
                  dim=args.dim, layers=args.layers, width=args.width,
                  pretrain_steps=args.pretrain_steps, flops_budget=args.flops_budget)
    cells = {"top_k": args.top_k, "experts": args.experts, "losses": args.losses,
             "router_init": args.router_init, "lr": args.lr, "regime": args.regime,
             "routing": args.routing, "balancer": args.balancer}
    try:
        if args.grid:
            grid = dict(args.grid)
            given = [k for k in grid if k != "task" and cells.get(k) is not None]
            if "task" in grid and "--task" in " ".join(argv).split():
                given.append("task")
            if given:
                raise ValueError(f"{FLAGS.get(given[0], '--' + given[0].replace('_', '-'))} is "
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


def __getattr__(name: str):
    """``run_study``, ``run_grid``, ``Progress`` and ``task_kwargs``, imported on first use:
    they import torch (and the runners matplotlib), which the parser does not (see :func:`run`)."""
    if name == "run_study":
        from moegrad.study.runner import run_study as value
    elif name == "run_grid":
        from moegrad.study.grid_runner import run_grid as value
    elif name == "Progress":
        from moegrad.study.progress import Progress as value
    elif name == "task_kwargs":
        from moegrad.study.settings import task_kwargs as value
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return value
