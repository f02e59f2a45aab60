"""Train a tiny MoE regression model and print its loss falling.

    python examples/train_tiny.py --estimator dense --steps 300

A teacher MoE (random, fixed) maps inputs to targets; a student MoE with the chosen router
gradient estimator learns to imitate it. Runs in seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import moegrad


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimator", default="topk", choices=moegrad.estimators.available(),
                        help="router gradient estimator (default: topk)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    parser.add_argument("--experts", type=int, default=8, help="number of experts (default: 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    torch.manual_seed(args.seed)
    dim, hidden = 16, 32
    teacher = moegrad.MoE(dim, hidden, args.experts, args.top_k).eval()
    with torch.no_grad():
        teacher.router.gate.weight.mul_(4.0)  # a teacher with decisive routing
        scale = teacher(torch.randn(4096, dim)).y.std()  # report the loss relative to Var(target)
    student = moegrad.MoE(dim, hidden, args.experts, args.top_k, estimator=args.estimator,
                          losses={"switch": 1e-2,
                                  **({"importance_load": 1e-2} if args.estimator == "noisy_topk" else {})})
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    print(f"training a {args.experts}-expert top-{args.top_k} MoE with estimator={args.estimator!r}")
    start = time.perf_counter()
    loss = None
    for step in range(1, args.steps + 1):
        x = torch.randn(256, dim)
        with torch.no_grad():
            target = teacher(x).y / scale
        out = student(x)
        loss = F.mse_loss(out.y, target)
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            load = out.stats.tokens_per_expert.float()
            print(f"step {step:4d}  relative mse {loss.item():.4f}  aux {out.aux_loss.item():.4f}  "
                  f"load min/max {int(load.min())}/{int(load.max())}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return loss.item()


if __name__ == "__main__":
    main()
