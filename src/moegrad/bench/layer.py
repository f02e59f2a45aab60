"""The PyTorch layer benchmark's cases and measurements (the ``torch`` runner of ``moegrad bench``).

For one config (d, f, E, k, T) :func:`build_cases` makes, in the order they are interleaved:

* ``dense_ideal``: one SwiGLU MLP of the same size (d -> f -> d) on k*T rows, the useful
  expert FLOPs with no routing;
* ``moegrad/<impl>``: :class:`moegrad.MoE` (topk, no balance loss) for each ``args.impls``;
* ``hf/eager``, ``hf/grouped_mm``: transformers' ``MixtralSparseMoeBlock`` (when it imports);
* ``moegrad/compiled``: ``torch.compile`` of the ``auto`` layer; ``compiled/<name>``: with
  each ``--compile-estimators``;
* ``estimator/<name>``: the ``auto`` layer with each estimator;
* ``routing/sinkhorn``: the ``auto`` layer (topk) with ``routing="sinkhorn"`` in training mode
  (the Sinkhorn iterations' cost next to ``estimator/topk``, on the same random router);
* ``routing/expert_choice``: the ``auto`` layer with ``routing="expert_choice"`` (experts take
  their top-c tokens, c = T * K / E; same weights as ``estimator/topk``);
* ``routing/remoe``: the ``auto`` layer with ``routing="remoe"`` as built: ReLU gates of a
  random router on random tokens, so about E / 2 experts per token (a zero-mean logit is
  positive half the time), not the K its L1 penalty steers a trained router to: the cost of
  ReMoE's first steps, an upper bound for later ones;
* ``balancing/quantile``: the ``auto`` layer with ``selection_bias=True`` observed by a
  :class:`moegrad.QuantileBalancer` (its per-forward histogram update; the bias stays 0, so
  the routing is ``estimator/topk``'s); BiasBalancer costs nothing per forward (it reads the
  router's load counts at ``step()``);
* ``router``: the router alone.

:func:`run_torch` times them (medians of interleaved rounds) and measures ``saved_mb``
(:func:`saved_bytes`) and ``peak_mb`` (:func:`peak_bytes`).
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from moegrad.balancing import QuantileBalancer
from moegrad.layer import MoE


@dataclass
class Case:
    """A timed case: ``step(backward)`` runs one forward (and backward) pass with fresh grads;
    ``forward()`` returns the differentiable output (for :func:`saved_bytes`); ``params`` are
    the tensors not counted as saved activations."""

    name: str
    kind: str
    step: Callable[[bool], None]
    forward: Callable[[], torch.Tensor]
    params: tuple


# ----------------------------------------------------------------------------- measuring
def saved_bytes(step: Callable[[], torch.Tensor], exclude: set) -> int:
    """Distinct storage bytes autograd saves for backward during ``step()`` (the forward),
    ignoring storages whose data pointer is in ``exclude`` (the parameters)."""
    seen: dict = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(seen.values())


def peak_bytes(step: Callable[[], None]) -> int:
    """Peak of the bytes allocated on the CPU during ``step()``, above the level at its start.

    CPU torch has no allocator peak counter, so this replays the allocation and free events that
    ``torch.profiler`` records with ``profile_memory=True`` in time order and takes the running
    maximum: every transient buffer (backward temporaries, padding, chunks) counts, not only what
    autograd saves. Run separately from the timed rounds (profiling slows a step)."""
    sys.stderr.flush()
    saved_fd = os.dup(2)  # kineto prints "profiler_start/stop" lines to fd 2: keep the bar clean
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


# ----------------------------------------------------------------------------- cases
def _dense_ideal(d, f, k, t, dtype, gen) -> Case:
    """One SwiGLU MLP (three bias-free linears) on k*T rows."""
    w1 = (torch.randn(f, d, generator=gen, dtype=dtype) / d ** 0.5).requires_grad_()
    w3 = (torch.randn(f, d, generator=gen, dtype=dtype) / d ** 0.5).requires_grad_()
    w2 = (torch.randn(d, f, generator=gen, dtype=dtype) / f ** 0.5).requires_grad_()
    x = torch.randn(k * t, d, generator=gen, dtype=dtype).requires_grad_()
    g = torch.randn(k * t, d, generator=gen, dtype=dtype)

    def forward():
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)

    return _case("dense_ideal", "dense", forward, (w1, w2, w3), x, g)


def _layer_case(name, kind, module, x, g, unpack) -> Case:
    return _case(name, kind, lambda: unpack(module(x)), tuple(module.parameters()), x, g)


def _case(name: str, kind: str, forward: Callable, params: tuple, x: Tensor, g: Tensor) -> Case:
    """A case whose step clears the gradients of ``params`` and ``x``, then runs ``forward``
    with its backward (of ``g``) or without gradient."""

    def step(backward: bool):
        for p in (*params, x):
            p.grad = None
        if backward:
            forward().backward(g)
        else:
            with torch.no_grad():
                forward()

    return Case(name, kind, step, forward, params)


def _hf_block(d, f, e, k, impl, dtype, gen):
    """A random MixtralSparseMoeBlock (no download), or None without transformers."""
    classes = _mixtral_block_class()
    if classes is None:
        return None
    MixtralSparseMoeBlock, MixtralConfig = classes
    # transformers reads config._experts_implementation at every experts call
    config = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=e,
                           num_experts_per_tok=k, experts_implementation=impl)
    block = MixtralSparseMoeBlock(config).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * config.initializer_range)
    return block


#: the cases build_cases adds after the estimators: three routings, the balancer, the router
TAIL_CASES = ("routing/sinkhorn", "routing/expert_choice", "routing/remoe", "balancing/quantile", "router")


def _mixtral_block_class():
    """transformers' MixtralSparseMoeBlock and MixtralConfig, or None without transformers."""
    try:  # transformers is optional (the "hf" extra)
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except Exception:  # pragma: no cover - transformers missing or broken
        return None
    return MixtralSparseMoeBlock, MixtralConfig


def case_count(args) -> int:
    """How many cases :func:`build_cases` times per config with ``args`` (the progress bar's total)."""
    hf = 0 if args.no_hf or _mixtral_block_class() is None else 2
    estimators = 1 + len([n for n in args.estimators if n != "topk"])
    compiled = 0 if args.no_compile else 1 + len(compile_estimators(args))
    return 1 + len(args.impls) + hf + compiled + estimators + len(TAIL_CASES)


def compile_estimators(args) -> list:
    """``--compile-estimators`` without repeats and without topk (that is ``moegrad/compiled``);
    absent from older argument sets: none."""
    return [n for n in dict.fromkeys(getattr(args, "compile_estimators", None) or []) if n != "topk"]


def build_cases(config: tuple, args) -> list:
    """The cases for one config, in the order they are interleaved."""
    d, f, e, k, t = config
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(t, d, generator=gen, dtype=dtype).requires_grad_()
    g = torch.randn(t, d, generator=gen, dtype=dtype)
    y_of = lambda out: out.y  # noqa: E731
    cases = [_dense_ideal(d, f, k, t, dtype, gen)]

    def layer(impl="auto", estimator="topk", routing="topk", **options):
        torch.manual_seed(args.seed)
        return MoE(d, f, e, k, impl=impl, estimator=None if routing == "remoe" else estimator,
                   losses={}, routing=routing, **options).to(dtype)

    for impl in args.impls:
        cases.append(_layer_case(f"moegrad/{impl}", "moegrad", layer(impl), x, g, y_of))
    if not args.no_hf:
        for impl in ("eager", "grouped_mm"):
            block = _hf_block(d, f, e, k, impl, dtype, gen)
            if block is not None:
                x3, g3 = x.detach().view(1, t, d).requires_grad_(), g.view(1, t, d)
                cases.append(_layer_case(f"hf/{impl}", "hf", block, x3, g3, lambda out: out))
    if not args.no_compile:
        compiled = torch.compile(layer("auto"))
        cases.append(_layer_case("moegrad/compiled", "compiled", compiled, x, g, y_of))
        for name in compile_estimators(args):
            compiled = torch.compile(layer("auto", name))
            cases.append(_layer_case(f"compiled/{name}", "compiled", compiled, x, g, y_of))
    estimators = ["topk"] + [n for n in args.estimators if n != "topk"]
    for name in estimators:
        cases.append(_layer_case(f"estimator/{name}", "estimator", layer("auto", name), x, g, y_of))
    cases.append(_layer_case("routing/sinkhorn", "routing", layer("auto", routing="sinkhorn"), x, g,
                             y_of))
    cases.append(_layer_case("routing/expert_choice", "routing",
                             layer("auto", routing="expert_choice"), x, g, y_of))
    cases.append(_layer_case("routing/remoe", "routing", layer("auto", routing="remoe"), x, g, y_of))
    balanced = layer("auto", selection_bias=True)  # bias 0: the routing of estimator/topk
    QuantileBalancer(balanced)  # its forward hook fills the histograms (step() is the optimizer's)
    cases.append(_layer_case("balancing/quantile", "balancing", balanced, x, g, y_of))
    router = layer("auto").router
    cases.append(_layer_case("router", "router", router, x, torch.randn(t, k, generator=gen),
                             lambda r: r.weights))
    return cases


def run_torch(config: tuple, args, progress) -> list:
    """The in-process PyTorch runner: every case, interleaved rounds, medians."""
    cases = build_cases(config, args)
    modes = [True] if args.no_forward else [True, False]
    times = {(c.name, m): [] for c in cases for m in modes}
    for round_ in range(args.warmup + args.repeats):
        for case in cases:
            for backward in modes:
                ms = _timed(functools.partial(case.step, backward))
                if round_ >= args.warmup:
                    times[(case.name, backward)].append(ms)
            progress.update(1)
    rows = []
    for case in cases:
        exclude = {p.untyped_storage().data_ptr() for p in case.params}
        fb = times[(case.name, True)]
        fo = times.get((case.name, False), [])
        rows.append({
            "name": case.name, "kind": case.kind,
            "fwd_bwd_ms": statistics.median(fb), "fwd_ms": statistics.median(fo) if fo else None,
            "fwd_bwd_ms_all": fb, "fwd_ms_all": fo,
            "tokens_per_s": config[4] / (statistics.median(fb) / 1e3),
            "saved_mb": saved_bytes(case.forward, exclude) / 2 ** 20,
            "peak_mb": peak_bytes(functools.partial(case.step, True)) / 2 ** 20,
        })
    return rows
