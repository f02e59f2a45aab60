"""Timing of :class:`moegrad.mlx.MoE` on MLX: the ``--backend mlx`` runner of ``moegrad bench``.

This module imports MLX at its top: :mod:`moegrad.bench.cli` imports it only when
``--backend mlx`` runs, so torch-only installs never need MLX.

Cases, timed in the same run with repetitions interleaved (medians reported):

* ``dense_ideal``: one SwiGLU MLP of the same size on K*T rows, the useful expert FLOPs with
  no routing (the yardstick of the PyTorch benchmark);
* ``mlx/gather_mm``: the MLX layer (expert-sorted rows through ``mx.gather_mm``), ``topk``;
* ``estimator/<name>``: the layer with each estimator (overhead relative to ``topk``);
* ``router``: the router alone (gate, scores, top-k, weights).

MLX is lazy, so every timed call ends with ``mx.eval`` of all it produced (the output; or the
loss and every gradient). ``peak_mb`` is MLX's peak memory during the case's forward+backward
(``mx.get_peak_memory``); ``saved_mb`` (autograd's saved tensors on the PyTorch side) has no MLX
counterpart and is None.

    python -m moegrad.bench.mlx --configs 512,1024,8,2,4096 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from moegrad._checks import check_int
from moegrad.mlx.layer import MoE

#: (dim, hidden, experts, top_k, tokens): the PyTorch benchmark's default rows
DEFAULT_CONFIGS = ((512, 1024, 8, 2, 4096), (512, 512, 64, 8, 2048), (256, 256, 128, 8, 1024))
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _peak_mb(fn: Callable[[], None]) -> float:
    if not hasattr(mx, "reset_peak_memory"):  # pragma: no cover - older MLX
        return float("nan")
    mx.reset_peak_memory()
    fn()
    return mx.get_peak_memory() / 2 ** 20


def case_count(estimators) -> int:
    """How many cases :func:`build_cases` makes for ``estimators`` (the progress bar's total):
    dense_ideal, mlx/gather_mm, estimator/topk and each other estimator, router."""
    return 4 + len([n for n in estimators if n != "topk"])


def build_cases(config: tuple, estimators=("topk",), dtype: str = "float32", seed: int = 0) -> list:
    """[(name, kind, forward(), fwd_bwd())] for one (dim, hidden, experts, top_k, tokens) config.
    Each callable runs one pass and evaluates everything it produced."""
    dim, hidden, experts, top_k, tokens = config
    for name, value, low in (("dim", dim, 1), ("hidden", hidden, 1), ("experts", experts, 1),
                             ("tokens", tokens, 1)):
        check_int(name, value, low)
    check_int("top_k", top_k, 1, experts)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(_DTYPES)}")
    dt = _DTYPES[dtype]
    mx.random.seed(seed)
    x = mx.random.normal((tokens, dim)).astype(dt)
    grad_y = mx.random.normal((tokens, dim)).astype(dt)
    rows = mx.random.normal((tokens * top_k, dim)).astype(dt)
    grad_rows = mx.random.normal((tokens * top_k, dim)).astype(dt)
    cases = []

    ideal = {"w1": mx.random.normal((hidden, dim)) / dim ** 0.5,
             "w3": mx.random.normal((hidden, dim)) / dim ** 0.5,
             "w2": mx.random.normal((dim, hidden)) / hidden ** 0.5}
    ideal = {k: v.astype(dt) for k, v in ideal.items()}

    def mlp(p, inp):
        return (nn.silu(inp @ p["w1"].T) * (inp @ p["w3"].T)) @ p["w2"].T

    ideal_grad = mx.value_and_grad(lambda p, inp: (mlp(p, inp) * grad_rows).sum(), argnums=(0, 1))
    mx.eval(x, grad_y, rows, grad_rows, ideal)
    cases.append(("dense_ideal", "dense", lambda: mx.eval(mlp(ideal, rows)),
                  lambda: mx.eval(ideal_grad(ideal, rows))))

    def layer_case(name: str, kind: str, module, unpack, grad_out) -> tuple:
        params = module.trainable_parameters()

        def loss(p, inp):
            module.update(p)
            return (unpack(module(inp)) * grad_out).sum()

        grad = mx.value_and_grad(loss, argnums=(0, 1))

        def fwd_bwd():
            mx.eval(grad(params, x))
            module.update(params)

        return (name, kind, lambda: mx.eval(unpack(module(x))), fwd_bwd)

    def layer(estimator: str) -> MoE:
        mx.random.seed(seed)
        moe = MoE(dim, hidden, experts, top_k, estimator=estimator, losses={})
        if dt != mx.float32:
            moe.set_dtype(dt)
        mx.eval(moe.parameters())
        return moe

    y_of = lambda out: out.y  # noqa: E731
    cases.append(layer_case("mlx/gather_mm", "moegrad", layer("topk"), y_of, grad_y))
    for name in ["topk"] + [n for n in estimators if n != "topk"]:
        cases.append(layer_case(f"estimator/{name}", "estimator", layer(name), y_of, grad_y))
    router = layer("topk").router
    weights_of = lambda r: mx.zeros((tokens, experts)).at[  # noqa: E731
        mx.arange(tokens)[:, None], r.indices].add(r.weights)  # [T, E] dense weights
    grad_weights = mx.random.normal((tokens, experts))
    cases.append(layer_case("router", "router", router, weights_of, grad_weights))
    return cases


def run_cases(config: tuple, cases: list, repeats: int = 5, warmup: int = 1, forward: bool = True,
              progress=None) -> list:
    """Interleaved rounds over ``cases`` -> one result row per case (the PyTorch bench's keys:
    name, kind, fwd_bwd_ms, fwd_ms, fwd_bwd_ms_all, fwd_ms_all, tokens_per_s, saved_mb)."""
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    times = {(name, mode): [] for name, *_ in cases for mode in ((True, False) if forward else (True,))}
    for round_ in range(warmup + repeats):
        for name, _, fwd, fwd_bwd in cases:
            for backward in ((True, False) if forward else (True,)):
                ms = _timed(fwd_bwd if backward else fwd)
                if round_ >= warmup:
                    times[(name, backward)].append(ms)
            if progress is not None:
                progress.update(1)
    out = []
    for name, kind, _, fwd_bwd in cases:
        fb, fo = times[(name, True)], times.get((name, False), [])
        out.append({"name": name, "kind": kind,
                    "fwd_bwd_ms": statistics.median(fb), "fwd_ms": statistics.median(fo) if fo else None,
                    "fwd_bwd_ms_all": fb, "fwd_ms_all": fo,
                    "tokens_per_s": config[4] / (statistics.median(fb) / 1e3),
                    "saved_mb": None, "peak_mb": _peak_mb(fwd_bwd)})
    return out


def run_mlx(config: tuple, args, progress) -> list:
    """``moegrad bench --backend mlx`` runner: (config, parsed args, tqdm) -> result rows.

    Reads ``args.estimators``, ``args.repeats``, ``args.warmup``, ``args.no_forward``,
    ``args.dtype`` and ``args.seed`` (missing ones take their defaults); ``--impls``, HF and
    torch.compile cases are PyTorch-only and ignored."""
    cases = build_cases(config, tuple(getattr(args, "estimators", None) or ("topk",)),
                        getattr(args, "dtype", "float32"), getattr(args, "seed", 0))
    return run_cases(config, cases, getattr(args, "repeats", 5), getattr(args, "warmup", 1),
                     not getattr(args, "no_forward", False), progress)


def run_config(dim: int, hidden: int, experts: int, top_k: int, tokens: int, repeats: int = 5,
               estimator: str = "topk", warmup: int = 1, seed: int = 0,
               dtype: str = "float32") -> dict:
    """Medians in ms for one config: ``forward_ms``/``fwd_bwd_ms`` of the layer with
    ``estimator``, ``ideal_forward_ms``/``ideal_fwd_bwd_ms`` of the dense ideal, the ratios
    ``forward_ratio``/``fwd_bwd_ratio`` (layer / ideal), ``tokens_per_s`` (fwd+bwd),
    ``router_fwd_bwd_ms`` and ``peak_mb`` (MLX peak memory of the layer's fwd+bwd)."""
    config = (dim, hidden, experts, top_k, tokens)
    cases = [c for c in build_cases(config, (estimator,), dtype, seed)
             if c[0] in ("dense_ideal", f"estimator/{estimator}", "router")]
    rows = {r["name"]: r for r in run_cases(config, cases, repeats, warmup)}
    layer, ideal = rows[f"estimator/{estimator}"], rows["dense_ideal"]
    return {"forward_ms": layer["fwd_ms"], "fwd_bwd_ms": layer["fwd_bwd_ms"],
            "ideal_forward_ms": ideal["fwd_ms"], "ideal_fwd_bwd_ms": ideal["fwd_bwd_ms"],
            "forward_ratio": layer["fwd_ms"] / ideal["fwd_ms"],
            "fwd_bwd_ratio": layer["fwd_bwd_ms"] / ideal["fwd_bwd_ms"],
            "tokens_per_s": layer["tokens_per_s"], "router_fwd_bwd_ms": rows["router"]["fwd_bwd_ms"],
            "peak_mb": layer["peak_mb"], "dim": dim, "hidden": hidden, "experts": experts,
            "top_k": top_k, "tokens": tokens, "estimator": estimator, "repeats": repeats,
            "dtype": dtype, "backend": "mlx", "device": str(mx.default_device())}


def _config(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 5:
        raise argparse.ArgumentTypeError(f"config {text!r} must be five integers dim,hidden,experts,top_k,tokens")
    return values


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moegrad.bench.mlx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=_config, nargs="+", default=list(DEFAULT_CONFIGS),
                   help="dim,hidden,experts,top_k,tokens (default: the PyTorch bench's three rows)")
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds (median)")
    p.add_argument("--estimator", default="topk", help="router estimator of the layer")
    p.add_argument("--json", action="store_true", help="print one JSON object per config")
    args = p.parse_args(argv)
    for cfg in args.configs:
        res = run_config(*cfg, repeats=args.repeats, estimator=args.estimator)
        if args.json:
            print(json.dumps(res))
        else:
            print(f"d={cfg[0]} f={cfg[1]} E={cfg[2]} k={cfg[3]} T={cfg[4]} {args.estimator}: "
                  f"fwd {res['forward_ms']:.1f} ms ({res['forward_ratio']:.2f}x ideal), "
                  f"fwd+bwd {res['fwd_bwd_ms']:.1f} ms ({res['fwd_bwd_ratio']:.2f}x ideal), "
                  f"{res['tokens_per_s']:.0f} tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
