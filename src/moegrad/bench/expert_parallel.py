"""Expert-parallel throughput and communication: tokens/s and bytes exchanged per step.

    python -m moegrad.bench.expert_parallel --world-size 1 2 4
    (the ``moegrad bench --world-size N`` runner)

For each world size W, W gloo processes on this machine (loopback) each hold E/W experts of one
:class:`moegrad.MoE` made expert-parallel, draw their own T tokens (weak scaling: the global
batch is W T) and time forward + backward steps. Reported per W:

* tokens/s: W T steps / wall time (every rank's tokens);
* all-to-all bytes/step/rank: what each rank sent to other ranks per training step through the
  all-to-alls (headers, the two token exchanges in forward and their two reverses in backward;
  ``dense`` adds its backward all-gather and score all-to-all), measured by
  :class:`moegrad.distributed.ExchangeStats`. The small all-reduces are not counted: the input
  check (5 W int64 per layer call), the balance-loss counts (E + 1 fp64) and, for
  ``default_moe`` in training, E (D + 1) fp32; they do not grow with T;
* model bytes: 4 K T D b (W - 1) / W for uniform routing (b bytes per element; see
  ``benchmarks/expert_parallel.md``);
* for W = 1, the plain (non-parallel) MoE as baseline, so the exchange overhead shows as a ratio.

On a CPU box every process shares the same cores (one torch thread per process by default:
several threads per process thrash on a loaded machine), so the numbers measure overhead and
bytes, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist

from moegrad._checks import check_int
from moegrad._testing import exit_without_teardown, free_port, init_process_group_for_tests, spawn_and_wait
from moegrad.distributed import expert_parallel
from moegrad.estimators import available
from moegrad.experts import IMPLS
from moegrad.layer import MoE

try:  # tqdm (the "bench" and "study" extras) only draws the progress bar
    from tqdm import tqdm
except ImportError:  # pragma: no cover - depends on the install
    tqdm = None

#: defaults of the benchmark's layer
DEFAULTS = dict(tokens=512, dim=64, hidden=128, experts=8, top_k=2, steps=10, warmup=2, estimator="topk",
                dtype="float32", seed=0, impl="auto")
#: --dtype names -> torch dtypes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def model_bytes(tokens: int, dim: int, top_k: int, world: int, element_size: int = 4) -> float:
    """Bytes one rank sends per training step with uniform routing and no drops:
    4 exchanges (dispatch, combine, and their reverses in backward) of K T rows of D elements,
    of which a fraction (W - 1) / W leaves the rank."""
    return 4 * top_k * tokens * dim * element_size * (world - 1) / world


def _step_time(moe, x, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        moe(x).y.square().mean().backward()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        moe(x).y.square().mean().backward()
    sync()
    return time.perf_counter() - start


def _worker(rank: int, world: int, port: int, out_path: str, cfg: dict, timeout: float,
            threads: int = 0) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    init_process_group_for_tests(rank, world, port, timeout)
    try:
        dtype = DTYPES[cfg["dtype"]]
        torch.manual_seed(cfg["seed"])  # the same model on every rank
        moe = MoE(cfg["dim"], cfg["hidden"], cfg["experts"], cfg["top_k"], impl=cfg["impl"],
                  estimator=cfg["estimator"], losses={"switch": 1e-2}).to(dtype)
        torch.manual_seed(cfg["seed"] * 65536 + rank)  # each rank's own sampling noise
        gen = torch.Generator().manual_seed(cfg["seed"] * 65536 + rank)
        x = torch.randn(cfg["tokens"], cfg["dim"], generator=gen).to(dtype)
        result = {"world_size": world}
        if world == 1:
            result["baseline_s"] = _step_time(moe, x, cfg["steps"], cfg["warmup"], lambda: None)
        expert_parallel(moe)
        barrier = dist.barrier
        elapsed = None
        for _ in range(cfg["warmup"]):
            moe(x).y.square().mean().backward()
        moe.experts.stats.reset()
        elapsed = _step_time(moe, x, cfg["steps"], 0, barrier)
        sent = torch.tensor([moe.experts.stats.reset() / cfg["steps"]], dtype=torch.float64)
        dist.all_reduce(sent)
        result.update(elapsed_s=elapsed, bytes_per_step_per_rank=float(sent) / world)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()
    exit_without_teardown()


def bench_expert_parallel(world_sizes=(1, 2, 4), *, tokens: int = DEFAULTS["tokens"],
                          dim: int = DEFAULTS["dim"], hidden: int = DEFAULTS["hidden"],
                          experts: int = DEFAULTS["experts"], top_k: int = DEFAULTS["top_k"],
                          steps: int = DEFAULTS["steps"], warmup: int = DEFAULTS["warmup"],
                          estimator: str = DEFAULTS["estimator"], dtype: str = DEFAULTS["dtype"],
                          seed: int = DEFAULTS["seed"], impl: str = DEFAULTS["impl"], threads: int = 1,
                          timeout: float = 300.0, progress: bool = True) -> list:
    """Run the benchmark for each world size; returns one dict per W with ``tokens_per_s``,
    ``bytes_per_step_per_rank`` (all-to-all bytes, see the module docstring),
    ``model_bytes_per_step_per_rank`` and, for W = 1, ``baseline_tokens_per_s`` (plain MoE) and
    ``overhead`` (EP time / baseline time). ``dtype``: "float32" or "bfloat16" (model and tokens);
    ``seed``: model seed (rank r's tokens and noise use seed * 65536 + r); ``impl``: the experts'
    backend (:data:`moegrad.experts.IMPLS`); ``threads``: torch threads per process (default 1),
    0 for cores // W."""
    for name, value in (("tokens", tokens), ("dim", dim), ("hidden", hidden), ("experts", experts),
                        ("top_k", top_k), ("steps", steps)):
        check_int(name, value, 1)
    check_int("warmup", warmup, 0)
    check_int("threads", threads, 0)
    check_int("seed", seed, 0)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is unknown; choose one of {list(IMPLS)}")
    for w in world_sizes:
        check_int("world_size", w, 1)
        if experts % w:
            raise ValueError(f"world_size={w} does not divide experts={experts}; expert parallelism "
                             "needs experts to be a multiple of the world size")
    cfg = dict(tokens=tokens, dim=dim, hidden=hidden, experts=experts, top_k=top_k, steps=steps,
               warmup=warmup, estimator=estimator, dtype=dtype, seed=seed, impl=impl)
    sizes = list(world_sizes)
    if progress and tqdm is not None:
        sizes = tqdm(sizes, desc="world sizes", unit="run")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in sizes:
            out_path = os.path.join(tmp, f"w{world}.json")
            spawn_and_wait(_worker, (world, free_port(), out_path, cfg, timeout, threads), world,
                           timeout + 60, f"world size {world}")
            with open(out_path) as f:
                r = json.load(f)
            row = {"world_size": world,
                   "tokens_per_s": world * tokens * steps / r["elapsed_s"],
                   "bytes_per_step_per_rank": r["bytes_per_step_per_rank"],
                   "model_bytes_per_step_per_rank": model_bytes(tokens, dim, top_k, world,
                                                                DTYPES[dtype].itemsize),
                   "step_ms": 1e3 * r["elapsed_s"] / steps}
            if "baseline_s" in r:
                row["baseline_tokens_per_s"] = tokens * steps / r["baseline_s"]
                row["overhead"] = r["elapsed_s"] / r["baseline_s"]
            rows.append(row)
    return rows


def format_table(rows: list, cfg: dict) -> str:
    """Markdown table of :func:`bench_expert_parallel`'s rows."""
    lines = [f"T={cfg['tokens']} tokens per rank, D={cfg['dim']}, H={cfg['hidden']}, "
             f"E={cfg['experts']}, K={cfg['top_k']}, estimator={cfg['estimator']}, "
             f"{cfg.get('dtype', 'float32')}, {cfg['steps']} timed steps (forward + backward)", "",
             "| W | tokens/s (all ranks) | step ms | all-to-all bytes sent/step/rank (measured) "
             "| model 4KTDb(W-1)/W |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world_size']} | {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | "
                     f"{r['bytes_per_step_per_rank']:.0f} | {r['model_bytes_per_step_per_rank']:.0f} |")
    base = [r for r in rows if "baseline_tokens_per_s" in r]
    if base:
        lines += ["", f"W=1 plain MoE (no exchange): {base[0]['baseline_tokens_per_s']:.0f} tokens/s; "
                      f"expert-parallel at W=1 takes {base[0]['overhead']:.2f}x its time"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=int, nargs="+", default=[1, 2, 4],
                        help="numbers of processes to run (default: 1 2 4)")
    for key in ("tokens", "dim", "hidden", "experts", "top_k", "steps", "warmup", "seed"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=DEFAULTS[key],
                            help=f"default: {DEFAULTS[key]}" + (" (tokens per rank)" if key == "tokens" else ""))
    parser.add_argument("--estimator", default=DEFAULTS["estimator"], choices=available(),
                        help="router gradient estimator (default: topk)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=DEFAULTS["dtype"],
                        help="model and token dtype (default: float32)")
    parser.add_argument("--impl", choices=list(IMPLS), default=DEFAULTS["impl"],
                        help="grouped expert backend (default: auto)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default: 1; 0 = cores // world size)")
    parser.add_argument("--json", default=None,
                        help="also write the rows as JSON to this path ('-': print only the JSON)")


def run(args) -> int:
    cfg = {k: getattr(args, k) for k in DEFAULTS}
    rows = bench_expert_parallel(tuple(args.world_size), threads=args.threads, **cfg)
    if args.json == "-":
        print(json.dumps({"config": cfg, "rows": rows}, indent=2))
        return 0
    print(format_table(rows, cfg))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "rows": rows}, f, indent=2)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moegrad.bench.expert_parallel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
