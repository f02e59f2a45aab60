"""Train the same small MoE model with each router gradient estimator and several seeds, under
equal step and wall-clock budgets, and write a report that says which estimator to use.

Output directory (``--out``, default ``study-<task>``):
  report.md      tables (mean ± std over seeds) and conclusions computed from the numbers
  metrics.json   per estimator: final loss, purity, dead experts, load CV, max violation,
                 router entropy, gradient cosines (vs the exact expected-loss gradient under the
                 estimator's own forward weights, per sample and of the mean of --diag-samples
                 samples, and vs the dense-mixture gradient), gradient variance, median time per
                 step, loss at equal wall-clock time, steps to a target loss; plus every run's
                 full history
  *.png          loss vs step and vs training time, load per expert, gradient cosine, purity

Tasks: ``clusters`` (default; C Gaussian clusters with one teacher map each, ground-truth
routing known, top-1 routing) and ``charlm`` (a tiny character-level transformer LM trained
on CPython's pydoc help topics; validation loss and bits per character). Nothing is
downloaded. ``--quick`` (8 estimators x 2 seeds x 800 steps) takes under a minute on 2 CPU
cores; the default run (3 seeds x 3000 steps) took about 6 minutes on the same machine.

examples:
  moegrad study --quick
  moegrad study --task charlm --estimators topk,dense,default_moe --seeds 2
  moegrad study --estimators topk,dense --losses switch=0.01 --out study-switch
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import warnings
from pathlib import Path
from typing import Optional

from moegrad import estimators as registry


def _estimators(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--estimators needs at least one name")
    for n in names:
        if n not in registry.available():
            raise argparse.ArgumentTypeError(
                f"unknown estimator {n!r}; choose from {','.join(registry.available())}")
    return names


def _losses(text: str) -> dict:
    from moegrad.losses import available

    if text.strip().lower() in ("", "none"):
        return {}
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in available():
            raise argparse.ArgumentTypeError(
                f"--losses expects name=coefficient pairs with names from {available()}, got {part!r}")
        try:
            out[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"coefficient of {name!r} must be a number, got {value!r}")
    return out


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moegrad.experts import IMPLS
    from moegrad.study.tasks import TASKS, get_task

    get_task("clusters")  # registers every task
    parser.add_argument("--task", default="clusters", choices=sorted(TASKS),
                        help="what to train on (default: clusters)")
    parser.add_argument("--estimators", type=_estimators, default=None, metavar="A,B,...",
                        help="comma-separated estimators to compare (default: all of "
                             f"{','.join(registry.available())})")
    parser.add_argument("--quick", action="store_true",
                        help="the short budget (clusters: 800 steps x 2 seeds; charlm: 100 x 1)")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help="step budget per run (default: the task's, see --quick)")
    parser.add_argument("--seeds", type=_positive_int, default=None,
                        help="number of seeds per estimator, 0..N-1 (default: the task's)")
    parser.add_argument("--time-budget", type=_positive_float, default=None, metavar="SECONDS",
                        help="wall-clock budget per run in seconds of training time; a run stops "
                             "at --steps or at this time, whichever comes first; > 0 (default: "
                             "300, or 60 with --quick)")
    parser.add_argument("--losses", type=_losses, default={}, metavar="NAME=COEF,...",
                        help="balance losses added to every run, e.g. switch=0.01,z_loss=0.001 "
                             "(default: none, so only the task gradient trains the router)")
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
                        help="output directory (default: study-<task>)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_study(task_name: str = "clusters", estimators: Optional[list] = None, *, quick: bool = False,
              steps: Optional[int] = None, seeds: Optional[int] = None,
              time_budget: Optional[float] = None, losses: Optional[dict] = None,
              eval_every: Optional[int] = None, diag_every: Optional[int] = None,
              diag_samples: int = 8, tau: float = 1.0, impl: str = "auto",
              out: Optional[Path] = None,
              progress: bool = True, command: str = "moegrad study") -> dict:
    """Run a study and write its directory; returns the metrics.json document."""
    from tqdm.auto import tqdm

    from moegrad.study.plots import write_plots
    from moegrad.study.report import aggregate, write_report
    from moegrad.study.tasks import get_task
    from moegrad.study.train import train_run

    cls = get_task(task_name)
    names = list(estimators or registry.available())
    default_steps, default_seeds = cls.quick if quick else cls.full
    steps = steps or default_steps
    seeds = seeds or default_seeds
    time_budget = time_budget if time_budget is not None else (60.0 if quick else 300.0)
    if time_budget <= 0:
        raise ValueError(f"time_budget={time_budget} must be > 0 seconds")
    eval_every = eval_every or max(1, steps // 20)
    diag_every = max(1, steps // 5) if diag_every is None else diag_every
    from moegrad.experts import IMPLS

    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; choose one of {list(IMPLS)}")
    if diag_every < 0:
        raise ValueError(f"diag_every={diag_every} must be >= 0 (0 skips the diagnostics)")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau={tau} must be a finite number > 0 (the temperature of the sampled "
                         "top-k policy of the exact reference)")
    out = Path(out or f"study-{task_name}")
    out.mkdir(parents=True, exist_ok=True)
    losses = dict(losses or {})
    runs = []
    bar = tqdm(total=len(names) * seeds * steps, disable=not progress, unit="step",
               desc=f"study {task_name}", file=sys.stderr)
    for seed in range(seeds):
        task = cls(seed)
        task.impl = impl
        for name in names:
            bar.set_postfix_str(f"{name} seed {seed}")
            with warnings.catch_warnings():  # the study measures these on purpose (report.md says so)
                warnings.filterwarnings("ignore", "estimator=.* gives the router no task gradient",
                                        UserWarning)
                run = train_run(task, name, seed, steps=steps, time_budget=time_budget,
                                eval_every=eval_every, diag_every=diag_every,
                                diag_samples=diag_samples, tau=tau, losses=losses,
                                on_step=lambda: bar.update(1))
            bar.update(steps - run["steps"])  # a run stopped by the clock
            runs.append(run)
    bar.close()
    args = {"steps": steps, "seeds": seeds, "time_budget": time_budget, "losses": losses,
            "eval_every": eval_every, "diag_every": diag_every, "diag_samples": diag_samples,
            "tau": tau, "impl": impl, "quick": quick, "estimators": names}
    doc = aggregate(runs, task, args)
    doc["runs"] = runs
    write_plots(runs, doc, out)
    write_report(doc, out, command)
    return doc


def run(args: argparse.Namespace) -> int:
    command = "moegrad study " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == "study" else "moegrad study"
    doc = run_study(args.task, args.estimators, quick=args.quick, steps=args.steps,
                    seeds=args.seeds, time_budget=args.time_budget, losses=args.losses,
                    eval_every=args.eval_every, diag_every=args.diag_every,
                    diag_samples=args.diag_samples, tau=args.tau, impl=args.impl, out=args.out,
                    progress=not args.no_progress, command=command.strip())
    out = args.out or Path(f"study-{args.task}")
    print(f"wrote {out}/report.md, {out}/metrics.json and plots")
    per = doc["estimators"]
    for name in sorted(per, key=lambda n: per[n]["final_loss"]["mean"]):
        print(f"  {name:18s} final val loss {per[name]['final_loss']['mean']:.4f}")
    return 0
