"""How well ReMoE's adaptive L1 coefficient steers the mean number of active experts to K.

A small regression task on clustered inputs (8 clusters in D=16; a bias-free gate can only
sparsify inputs that are not symmetric about 0): one ``moegrad.MoE(routing="remoe")`` layer,
E=8, K=2, Adam, batches of 64 tokens. For each ``--alpha`` (the coefficient's factor per step,
``l1_alpha``) and seed it records the mean active experts per token at every step, and prints
the mean over the last quarter of the run with its 95% confidence interval over the seeds, and
the relative error |a - K| / K. Next to it, the task loss of the same runs and of
``routing="topk"`` (the same task, seeds and initial experts; switch loss 1e-2), with the
paired difference (ReMoE - topk, same seed) and its 95% CI.

    python examples/remoe_sparsity.py --steps 400 --seeds 5 --alpha 1.2 1.05
"""

from __future__ import annotations

import argparse
import statistics

import torch

import moegrad
from moegrad.study.stats import describe, paired_t_test  # needs the study extra (scipy)


def run(routing: str, seed: int, steps: int, alpha: float, init: float, dim: int = 16,
        experts: int = 8, k: int = 2) -> tuple[list, list]:
    """-> (mean active experts per token, task loss) at every step."""
    torch.manual_seed(seed)
    centers = torch.randn(8, dim)
    a, b = torch.randn(dim, 2 * dim) / dim ** 0.5, torch.randn(2 * dim, dim) / (2 * dim) ** 0.5
    options = dict(l1_init=init, l1_alpha=alpha) if routing == "remoe" else dict(losses={"switch": 1e-2})
    torch.manual_seed(seed + 1000)  # the same initial layer for both routings
    moe = moegrad.MoE(dim, 2 * dim, experts, k, routing=routing, **options)
    opt = torch.optim.Adam(moe.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(seed + 2000)
    active, losses = [], []
    for _ in range(steps):
        x = 0.5 * torch.randn(64, dim, generator=data) + centers[torch.randint(0, 8, (64,), generator=data)]
        out = moe(x)
        task = (out.y - torch.tanh(x @ a) @ b).square().mean()
        opt.zero_grad()
        (task + out.aux_loss).backward()
        opt.step()
        active.append(float(out.stats.tokens_per_expert.sum()) / x.shape[0])
        losses.append(float(task.detach()))
    return active, losses


def main(argv=None) -> dict:
    """Run the comparison and print it -> {setting: {"active", "loss"[, "loss_minus_topk"]}}
    (:func:`moegrad.study.stats.describe` / :func:`~moegrad.study.stats.paired_t_test` dicts)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps per run (default 400)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per setting (default 5)")
    parser.add_argument("--alpha", type=float, nargs="+", default=[1.2, 1.05],
                        help="l1_alpha values to compare (default: the paper's 1.2, and 1.05)")
    parser.add_argument("--init", type=float, default=1e-8,
                        help="l1_init, the coefficient's starting value (default the paper's 1e-8)")
    args = parser.parse_args(argv)
    if args.steps < 8 or args.seeds < 2:
        parser.error("--steps must be >= 8 and --seeds >= 2 (a confidence interval needs 2 seeds)")
    tail = args.steps // 4
    print(f"E=8, K=2, {args.steps} steps, {args.seeds} seeds; means over the last {tail} steps, "
          "95% CI over seeds")
    print(f"{'setting':<22} {'active experts [95% CI]':>26} {'|a-K|/K':>8} "
          f"{'task loss [95% CI]':>28} {'loss - topk [95% CI]':>30}")
    topk = [statistics.mean(run("topk", s, args.steps, 0.0, 0.0)[1][-tail:]) for s in range(args.seeds)]
    summary = {"topk": {"loss": describe(topk)}}
    for alpha in args.alpha:
        runs = [run("remoe", s, args.steps, alpha, args.init) for s in range(args.seeds)]
        act = describe([statistics.mean(a[-tail:]) for a, _ in runs])
        loss = [statistics.mean(l[-tail:]) for _, l in runs]
        diff = paired_t_test(loss, topk)
        print(f"{'remoe l1_alpha=' + str(alpha):<22} {_ci(act['mean'], act['ci95'], 3):>26} "
              f"{abs(act['mean'] - 2) / 2:8.1%} {_ci(describe(loss)['mean'], describe(loss)['ci95'], 4):>28} "
              f"{_ci(diff['mean_diff'], diff['ci95'], 4):>30}")
        summary[f"remoe l1_alpha={alpha}"] = {"active": act, "loss": describe(loss), "loss_minus_topk": diff}
    t = describe(topk)
    print(f"{'topk + switch 1e-2':<22} {'2 (fixed)':>26} {'':8} {_ci(t['mean'], t['ci95'], 4):>28}")
    return summary


def _ci(mean: float, ci: list, digits: int) -> str:
    return f"{mean:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"

if __name__ == "__main__":
    main()
