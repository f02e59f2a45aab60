"""Benchmark moegrad.MoE against the dense ideal and Hugging Face's Mixtral block.

For each config (d, f, E, k, T) it times, interleaved over ``--repeats`` rounds (medians):

* ``dense_ideal``: one SwiGLU MLP of the same size (d -> f -> d) on k*T rows, i.e. exactly the
  useful expert FLOPs with no routing: the yardstick every ratio is taken against, same run;
* ``moegrad/<impl>``: ``moegrad.MoE`` (topk estimator, no balance loss) for each ``--impls``;
* ``hf/eager``, ``hf/grouped_mm``: transformers' ``MixtralSparseMoeBlock`` built from a tiny
  random ``MixtralConfig`` with ``experts_implementation`` set (when transformers imports);
* ``moegrad/compiled``: ``torch.compile`` of the ``auto`` layer (unless ``--no-compile``), and
  ``compiled/<name>`` of the layer with each ``--compile-estimators``;
* ``estimator/<name>``: the ``auto`` layer with each ``--estimators`` (overhead vs ``topk``);
* ``router``: the router alone (gate, softmax, top-k, weights), its share of the layer time.

Per case: forward+backward ms, forward-only ms (under no_grad), tokens/s (T / fwd+bwd time),
``peak_mb``: the peak of the bytes allocated during one forward+backward above the level at its
start (CPU torch has no allocator peak counter, so it is rebuilt from ``torch.profiler``'s
allocation/free events), and ``saved_mb``: the distinct tensor memory autograd keeps between
forward and backward (parameters excluded), measured with saved-tensor hooks.

``--backend mlx`` runs the same layers in MLX and prints the PyTorch ones beside them;
``--world-size 1 2 4`` times expert parallelism over gloo processes instead.

Example:
    moegrad bench --quick --json bench.json
    moegrad bench --configs 512,1024,8,2,4096 --impls auto,loop --repeats 7
    moegrad bench --backend mlx --configs 256,512,8,2,1024 --estimators topk,dense
    moegrad bench --world-size 1 2 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import types
from typing import Callable, Optional

# torch and the timed modules are imported when a command runs: ``moegrad bench --help`` loads none
try:  # tqdm (the "bench" and "study" extras) only draws the progress bar
    from tqdm import tqdm
except ImportError:  # pragma: no cover - depends on the install
    tqdm = None

DEFAULT_CONFIGS = ((512, 1024, 8, 2, 4096), (512, 512, 64, 8, 2048), (256, 256, 128, 8, 1024))
QUICK_CONFIGS = ((256, 512, 8, 2, 1024), (128, 128, 64, 8, 512))
DEFAULT_IMPLS = ("auto", "loop", "grouped_mm", "bmm")
DEFAULT_ESTIMATORS = ("topk", "dense", "default_moe", "straight_through")


# ----------------------------------------------------------------------------- arguments
def _config(text: str) -> tuple:
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 5 or min(values) < 1 or values[3] > values[2]:
        raise argparse.ArgumentTypeError(
            f"config {text!r} must be five positive ints d,f,E,k,T with k <= E, e.g. 512,1024,8,2,4096")
    return values


def _names(allowed: Callable[[], tuple]) -> Callable[[str], list]:
    """A comma-separated subset of ``allowed()`` (called when the option is parsed)."""
    def parse(text: str) -> list:
        names = [n for n in text.split(",") if n]
        bad = [n for n in names if n not in allowed()]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: choose a comma-separated subset of {list(allowed())}")
        return names
    return parse


def _impls() -> tuple:
    from moegrad.experts import IMPLS
    return IMPLS


def _estimators() -> tuple:
    from moegrad import estimators
    return tuple(estimators.available())


def run_torch(config: tuple, args, progress) -> list:
    """``--backend torch``: :func:`moegrad.bench.layer.run_torch`."""
    from moegrad.bench.layer import run_torch as runner
    return runner(config, args, progress)


def run_mlx(config: tuple, args, progress) -> list:
    """``--backend mlx``: the same cases on MLX (:func:`moegrad.bench.mlx.run_mlx`)."""
    try:  # MLX is optional (the "mlx" extra): torch-only users never import it
        from moegrad.bench.mlx import run_mlx as runner
    except ImportError as err:  # pragma: no cover - depends on the machine
        raise ValueError(f"--backend mlx needs MLX ({err}); install it with pip install 'moegrad[mlx]'") from err
    return runner(config, args, progress)


#: --backend name -> runner(config, args, progress) -> list of result dicts
RUNNERS: dict = {"torch": run_torch, "mlx": run_mlx}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", type=_config, nargs="+", metavar="d,f,E,k,T", default=None,
                        help="model dim, expert hidden dim, experts, top-k, tokens "
                             f"(default: {' '.join(','.join(map(str, c)) for c in DEFAULT_CONFIGS)})")
    parser.add_argument("--impls", type=_names(_impls), default=list(DEFAULT_IMPLS),
                        help=f"moegrad expert backends to time (default: {','.join(DEFAULT_IMPLS)})")
    parser.add_argument("--estimators", type=_names(_estimators),
                        default=list(DEFAULT_ESTIMATORS),
                        help="estimators for the overhead table, timed with impl=auto "
                             f"(default: {','.join(DEFAULT_ESTIMATORS)}; topk is always added)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians reported (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="small configs, 3 rounds, no torch.compile: a smoke run of a minute")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face Mixtral block")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    parser.add_argument("--compile-estimators", type=_names(_estimators), default=[], metavar="ESTIMATORS",
                        help="also time torch.compile of the auto layer with these estimators, as "
                             "compiled/<name> beside estimator/<name> (default: none; topk is "
                             "moegrad/compiled already)")
    parser.add_argument("--no-forward", action="store_true", help="skip the forward-only timings")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--backend", choices=sorted(RUNNERS), default="torch",
                        help="where the layers run: 'torch' (this process, default) or 'mlx' "
                             "(MLX on its default device; --impls, HF and compile cases are torch-only)")
    parser.add_argument("--world-size", type=int, nargs="+", default=None, metavar="W",
                        help="instead: expert-parallel tokens/s and bytes exchanged per step with W "
                             "gloo processes each (e.g. --world-size 1 2 4; --estimators NAME "
                             "picks one estimator, default topk); see "
                             "python -m moegrad.bench.expert_parallel --help for its shape options")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", default=None, help="write all results as JSON ('-' = stdout)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def summarize(config: tuple, rows: list) -> dict:
    """Ratios to the dense ideal (same run), estimator overhead vs topk, router share."""
    by_name = {r["name"]: r for r in rows}
    dense = by_name["dense_ideal"]
    for r in rows:
        r["ratio_fwd_bwd"] = r["fwd_bwd_ms"] / dense["fwd_bwd_ms"]
        r["ratio_fwd"] = (r["fwd_ms"] / dense["fwd_ms"]) if r["fwd_ms"] and dense["fwd_ms"] else None
    out = {"config": dict(zip(("d", "f", "E", "k", "T"), config)), "results": rows}
    topk = by_name.get("estimator/topk")
    if topk is not None:
        out["estimator_overhead"] = {r["name"].split("/", 1)[1]: r["fwd_bwd_ms"] / topk["fwd_bwd_ms"]
                                     for r in rows if r["kind"] == "estimator"}
        if "router" in by_name:
            out["router_share"] = by_name["router"]["fwd_bwd_ms"] / topk["fwd_bwd_ms"]
    hf = by_name.get("hf/grouped_mm")
    ours = by_name.get("moegrad/auto")
    if hf is not None and ours is not None:
        out["speedup_vs_hf_grouped_mm"] = hf["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
        out["saved_mb_vs_hf_grouped_mm"] = ours["saved_mb"] / hf["saved_mb"] if hf["saved_mb"] else None
        out["peak_mb_vs_hf_grouped_mm"] = ours["peak_mb"] / hf["peak_mb"] if hf["peak_mb"] else None
    if "moegrad/compiled" in by_name and ours is not None:
        out["compiled_vs_eager"] = by_name["moegrad/compiled"]["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
    return out


#: the table's columns: header and minimum width (a longer cell widens its column)
_COLUMNS = (("case", 24), ("fwd+bwd ms", 11), ("x dense", 8), ("fwd ms", 9), ("x dense", 8),
            ("tok/s", 9), ("saved MB", 9), ("peak MB", 9))


def _cells(r: dict) -> list:
    """One result row as the table's cell strings (``-`` where there is no value)."""
    fwd = [f"{r['fwd_ms']:.1f}", f"{r['ratio_fwd']:.2f}x"] if r["fwd_ms"] else ["-", "-"]
    return ([r["name"], f"{r['fwd_bwd_ms']:.1f}", f"{r['ratio_fwd_bwd']:.2f}x"] + fwd
            + [f"{r['tokens_per_s']:.0f}"]
            + ["-" if r[k] is None else f"{r[k]:.1f}" for k in ("saved_mb", "peak_mb")])


def _widths(rows: list) -> list:
    """Each column's width: its minimum, or its longest cell (header included)."""
    cells = [[name for name, _ in _COLUMNS]] + [_cells(r) for r in rows]
    return [max([low] + [len(c[i]) for c in cells]) for i, (_, low) in enumerate(_COLUMNS)]


def _line(cells: list, widths: list) -> str:
    """The case name left-aligned, the numbers right-aligned."""
    return "  " + " ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])


def format_table(summary: dict, widths: Optional[list] = None) -> str:
    """The text table of one :func:`summarize` result; ``widths``: the column widths (default:
    from the content, the MLX and PyTorch rows of ``--backend mlx`` together)."""
    c = summary["config"]
    if widths is None:
        widths = _widths(summary["results"] + summary.get("torch", {}).get("results", []))
    lines = [f"config d={c['d']} f={c['f']} E={c['E']} k={c['k']} T={c['T']}",
             _line([name for name, _ in _COLUMNS], widths)]
    lines += [_line(_cells(r), widths) for r in summary["results"]]
    for key in ("speedup_vs_hf_grouped_mm", "saved_mb_vs_hf_grouped_mm", "peak_mb_vs_hf_grouped_mm",
                "router_share", "compiled_vs_eager"):
        if summary.get(key) is not None:
            lines.append(f"  {key}: {summary[key]:.3f}")
    if "estimator_overhead" in summary:
        lines.append("  estimator time / topk: " + ", ".join(
            f"{k}={v:.2f}x" for k, v in summary["estimator_overhead"].items()))
    if "torch" in summary:
        lines.append("  the same cases in PyTorch (this process, impl auto):")
        lines += ["  " + line for line in format_table(summary["torch"], widths).splitlines()[2:]]
        lines.append("  fwd+bwd time MLX / PyTorch: " + ", ".join(
            f"{k}={v:.2f}x" for k, v in summary["mlx_vs_torch"].items()))
    return "\n".join(lines)


def run_world_sizes(args) -> int:
    """``--world-size``: :func:`moegrad.bench.expert_parallel.bench_expert_parallel` per config.

    Mapped options: ``--configs d,f,E,k,T`` -> dim, hidden, experts, top_k, tokens (per rank; one
    run of every world size per config, default: the distributed benchmark's shape);
    ``--repeats`` -> timed steps (``--quick``: at most 3); ``--warmup`` -> untimed steps;
    ``--dtype``, ``--seed``, ``--threads`` (default 1 per process); ``--estimators`` -> one
    estimator; ``--impls`` -> one expert backend. JSON (``--json PATH``, or ``-`` to print only
    the JSON to stdout): ``{"config", "rows"}``, a list of them for several configs. Refused:
    ``--backend mlx``; ``--no-hf/--no-compile/--no-forward`` have nothing to skip here.
    """
    from moegrad.bench import expert_parallel

    if args.backend != "torch":
        raise ValueError(f"--world-size runs torch.distributed (gloo) processes; --backend "
                         f"{args.backend!r} is not supported with it (use --backend torch)")
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats={args.repeats} (timed steps) must be >= 1 and "
                         f"--warmup={args.warmup} >= 0")
    if args.threads is not None and args.threads < 0:
        raise ValueError(f"--threads={args.threads} must be >= 0 (0 = cores // world size)")
    names = sorted(set(args.estimators))
    if len(names) > 1 and args.estimators != list(DEFAULT_ESTIMATORS):
        raise ValueError(f"--world-size times one estimator per run, got --estimators "
                         f"{','.join(names)}; pass a single name (e.g. --estimators dense)")
    impls = sorted(set(args.impls))
    if len(impls) > 1 and args.impls != list(DEFAULT_IMPLS):
        raise ValueError(f"--world-size times one expert backend per run, got --impls "
                         f"{','.join(impls)}; pass a single name (e.g. --impls loop)")
    base = dict(expert_parallel.DEFAULTS)
    base.update(estimator=names[0] if len(names) == 1 else "topk",
                impl=impls[0] if len(impls) == 1 else "auto",
                steps=min(args.repeats, 3) if args.quick else args.repeats,
                warmup=args.warmup, dtype=args.dtype, seed=args.seed)
    default_shape = tuple(expert_parallel.DEFAULTS[k] for k in ("dim", "hidden", "experts", "top_k", "tokens"))
    results = []
    for d, f, e, k, t in args.configs or [default_shape]:
        cfg = dict(base, dim=d, hidden=f, experts=e, top_k=k, tokens=t)
        rows = expert_parallel.bench_expert_parallel(
            tuple(args.world_size), threads=1 if args.threads is None else args.threads,
            progress=not args.no_progress, **cfg)
        results.append({"config": cfg, "rows": rows})
    if args.json == "-":
        json.dump(results[0] if len(results) == 1 else results, sys.stdout, indent=1)
        print()
        return 0
    print("\n\n".join(expert_parallel.format_table(r["rows"], r["config"]) for r in results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results[0] if len(results) == 1 else results, fh, indent=1)
    return 0


def _progress_bar(total: int, disable: bool):
    """tqdm's bar over ``total`` cases on stderr; without tqdm, an object whose update() does
    nothing."""
    if tqdm is None:
        return contextlib.nullcontext(types.SimpleNamespace(update=lambda n=1: None))
    return tqdm(total=total, disable=disable, desc="bench", unit="case", file=sys.stderr)


def run(args) -> int:
    import torch

    from moegrad.bench.layer import case_count

    if args.world_size:
        return run_world_sizes(args)
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats={args.repeats} must be >= 1 and --warmup={args.warmup} >= 0")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads={args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    configs = args.configs or (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    if args.quick:
        args.repeats, args.no_compile = min(args.repeats, 3), True
    runner = RUNNERS[args.backend]
    if args.backend == "mlx":  # the MLX cases, then the same layers in PyTorch (impl auto) beside them
        torch_args = argparse.Namespace(**{**vars(args), "impls": ["auto"], "no_hf": True,
                                           "no_compile": True})
        from moegrad.bench.mlx import case_count as mlx_case_count
        per_config = (args.warmup + args.repeats) * (mlx_case_count(args.estimators) + case_count(torch_args))
    else:
        per_config = (args.warmup + args.repeats) * case_count(args)
    summaries = []
    with _progress_bar(per_config * len(configs), args.no_progress) as progress:
        for config in configs:
            summary = summarize(config, runner(config, args, progress))
            if args.backend == "mlx":
                beside = summarize(config, run_torch(config, torch_args, progress))
                summary["torch"] = beside
                torch_ms = {r["name"]: r["fwd_bwd_ms"] for r in beside["results"]}
                summary["mlx_vs_torch"] = {r["name"]: r["fwd_bwd_ms"] / torch_ms[r["name"]]
                                           for r in summary["results"] if r["name"] in torch_ms}
            summaries.append(summary)
    try:  # transformers is optional (the "hf" extra): only its version is recorded here
        import transformers
        hf_version = transformers.__version__
    except Exception:  # pragma: no cover
        hf_version = None
    report = {"command": "moegrad bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
              "backend": args.backend, "torch": torch.__version__, "transformers": hf_version,
              "threads": torch.get_num_threads(), "dtype": args.dtype, "repeats": args.repeats,
              "platform": platform.platform(), "configs": summaries}
    if args.json == "-":
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print("\n\n".join(format_table(s) for s in summaries))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1)
    return 0
