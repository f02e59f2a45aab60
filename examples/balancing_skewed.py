"""Quantile Balancing against BiasBalancer and the switch loss on a deliberately skewed router.

    python examples/balancing_skewed.py --steps 100 --seeds 3 --out balancing_skewed.png
    python examples/balancing_skewed.py --steps 300 --seeds 5 --bias-gamma 1e-3 3e-3 1e-2 3e-2

A student moegrad.MoE (E=8 experts, top-2, softmax scores) imitates a fixed random teacher MoE
on random inputs that lean along a direction u; the student's gate starts skewed towards
experts 0 and 1 along u (initial max violation about 2: those two take nearly every token).
Three balancing set-ups train the same student from the same start, with Adam on every
parameter (the gate too) and 2 micro-batches per optimizer step:

    switch    the switch loss only (coefficient --switch, no selection bias)
    bias      moegrad.BiasBalancer (DeepSeek-V3; gamma from --bias-gamma, default its own 1e-3,
              several values give one set-up each), no balance loss
    quantile  moegrad.QuantileBalancer (Kimi K3, default bins 4096), no balance loss

Each step records the max load violation max_i load_i / (K T / E) - 1 of that step's tokens
(moegrad.diagnostics.max_violation of the loads the balancer or router counted). The plot
(PNG written to --out) shows the mean over seeds per step with the min..max band of each
set-up; the table gives the final and the median (over the second half of the steps)
violation, as mean +- std over seeds, and the first step below a violation of 0.3 per seed
("-": never). CPU, well under a minute at the defaults.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import moegrad
from moegrad.diagnostics import max_violation

D, H, E, K, T = 16, 32, 8, 2, 256


def run(method: str, seed: int, steps: int, switch: float, skew: float, gamma: float = 1e-3) -> list[float]:
    """Max violation per optimizer step of one set-up and seed."""
    torch.manual_seed(seed)
    teacher = moegrad.MoE(D, H, E, K).requires_grad_(False)
    u = torch.randn(D)
    u /= u.norm()
    torch.manual_seed(seed + 1000)  # the same student start for every method
    losses = {"switch": switch} if method == "switch" else {}
    student = moegrad.MoE(D, H, E, K, selection_bias=method != "switch", losses=losses)
    with torch.no_grad():
        student.router.gate.weight[:2] += skew * u
    balancer = {"bias": lambda m: moegrad.BiasBalancer(m, gamma=gamma),
                "quantile": moegrad.QuantileBalancer}.get(method)
    balancer = balancer(student) if balancer else None
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 2000)
    out = []
    for _ in range(steps):
        for _ in range(2):  # micro-batches
            x = torch.randn(T, D, generator=gen) + u
            res = student(x)
            loss = F.mse_loss(res.y, teacher(x).y) + res.aux_loss
            (loss / 2).backward()
        opt.step()
        opt.zero_grad()
        load = balancer.step()[0] if balancer else student.router.reset_load_counts().float()
        out.append(max_violation(load))
    return out


def _sd(values: list) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per set-up (default: 3)")
    parser.add_argument("--switch", type=float, default=0.01, help="switch loss coefficient (default: 0.01)")
    parser.add_argument("--skew", type=float, default=2.0,
                        help="gate skew towards experts 0 and 1 (default: 2.0)")
    parser.add_argument("--out", default="balancing_skewed.png",
                        help="path of the PNG plot of max violation per step (default: balancing_skewed.png)")
    parser.add_argument("--bias-gamma", type=float, nargs="+", default=[1e-3], metavar="GAMMA",
                        help="BiasBalancer's gamma; several values run one set-up each (default: 1e-3)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.seeds < 1:
        parser.error(f"--steps and --seeds must be >= 1, got {args.steps} and {args.seeds}")
    torch.set_num_threads(1)
    setups = [("switch", "switch", 0.0)]
    setups += [("bias" if len(args.bias_gamma) == 1 else f"bias {g:g}", "bias", g) for g in args.bias_gamma]
    setups += [("quantile", "quantile", 0.0)]
    curves = {label: [run(method, s, args.steps, args.switch, args.skew, gamma) for s in range(args.seeds)]
              for label, method, gamma in setups}

    import matplotlib  # the plot only: the runs above need no matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, args.steps + 1)
    for method, style in zip(curves, ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)))):
        per_step = list(zip(*curves[method]))
        mean = [statistics.fmean(v) for v in per_step]
        ax.plot(steps, mean, linestyle=style, label=method, linewidth=1.5)
        ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.2)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("max load violation (max_i load_i / (KT/E) - 1)")
    ax.set_title(f"skewed router, E={E}, K={K}, {2 * T} tokens/step, {args.seeds} seeds (band: min..max)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)

    half = args.steps // 2
    summary = {}
    width = max(len(m) for m in curves) + 2
    print(f"{'method':<{width}} {'final':>16} {'median 2nd half':>18}  first step < 0.3")
    for method in curves:
        final = [c[-1] for c in curves[method]]
        median = [statistics.median(c[half:]) for c in curves[method]]
        summary[method] = {"final": statistics.fmean(final), "median": statistics.fmean(median)}
        first = [next((str(i + 1) for i, v in enumerate(c) if v < 0.3), "-") for c in curves[method]]
        print(f"{method:<{width}} {statistics.fmean(final):>9.3f} +- {_sd(final):.3f} "
              f"{statistics.fmean(median):>11.3f} +- {_sd(median):.3f}  {' '.join(first)}")
    print(f"plot: {args.out}")
    return summary


if __name__ == "__main__":
    main()
