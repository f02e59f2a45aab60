"""Training-step speed of a small random-init Qwen3-MoE: moegrad.hf.patch vs transformers' experts.

One model, one batch; each variant is a forward + backward of the LM loss (gradients zeroed
before, no optimizer step). Variants run interleaved (round r runs every variant once, in a
rotated order) after warm-up rounds, and the median over rounds is reported with its ratio to
HF ``grouped_mm`` measured in the same run.

    python benchmarks/hf_bench.py --rounds 15 --out benchmarks/hf.md

Variants: ``hf_eager`` / ``hf_grouped_mm`` (unpatched, ``model.set_experts_implementation``),
``moegrad_topk`` / ``moegrad_dense`` / ``moegrad_default_moe`` (patched, moegrad's dispatch and
grouped expert compute, ``impl="auto"``), ``moegrad_topk_grouped_mm`` / ``moegrad_topk_bmm``
(``impl`` forced), ``moegrad_topk_impl_hf`` (patched routing, HF ``grouped_mm`` experts).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch


def build(args):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=2 * args.dim,
                         moe_intermediate_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=args.dim // 8,
                         num_experts=args.experts, num_experts_per_tok=args.top_k,
                         norm_topk_prob=True, max_position_embeddings=args.seq,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg).float().train()


VARIANTS = {
    "hf_eager": (None, "eager", None),
    "hf_grouped_mm": (None, "grouped_mm", None),
    "moegrad_topk": ("topk", "grouped_mm", None),
    "moegrad_dense": ("dense", "grouped_mm", None),
    "moegrad_default_moe": ("default_moe", "grouped_mm", None),
    "moegrad_topk_impl_hf": ("topk", "grouped_mm", "hf"),
    "moegrad_topk_grouped_mm": ("topk", "grouped_mm", "grouped_mm"),
    "moegrad_topk_bmm": ("topk", "grouped_mm", "bmm"),
}


def step(model, x) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(x, labels=x).loss.backward()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dim", type=int, default=256, help="hidden size D (default 256)")
    p.add_argument("--hidden", type=int, default=128, help="expert intermediate size H (default 128)")
    p.add_argument("--experts", type=int, default=32, help="routed experts E (default 32)")
    p.add_argument("--top-k", type=int, default=4, help="experts per token K (default 4)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="", help="append a markdown table to this file")
    args = p.parse_args(argv)
    import moegrad.experts
    import moegrad.hf

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.variants.split(",") if n]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        p.error(f"--variants {bad} unknown; choose from {list(VARIANTS)}")
    model = build(args)
    x = torch.randint(3, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    times = {n: [] for n in names}
    for r in range(args.warmup + args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            estimator, hf_impl, impl = VARIANTS[name]
            model.set_experts_implementation(hf_impl)
            if estimator is not None:
                moegrad.hf.patch(model, estimator, impl=impl)
            t = step(model, x)
            if estimator is not None:
                moegrad.hf.unpatch(model)
            if r >= args.warmup:
                times[name].append(t)
    base = statistics.median(times["hf_grouped_mm"]) if "hf_grouped_mm" in times else None
    grouped = "grouped_mlp" if hasattr(moegrad.experts, "grouped_mlp") else "private unbind loop"
    lines = [f"Qwen3-MoE D={args.dim} H={args.hidden} E={args.experts} K={args.top_k} "
             f"layers={args.layers} batch={args.batch}x{args.seq}, fp32, forward+backward; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{platform.machine()}; moegrad expert compute: {grouped}",
             "", "| variant | median ms | min ms | vs hf_grouped_mm |", "|---|---:|---:|---:|"]
    for name in names:
        med = statistics.median(times[name])
        ratio = f"{med / base:.2f}x" if base else "-"
        lines.append(f"| {name} | {med * 1e3:.1f} | {min(times[name]) * 1e3:.1f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + f"Command: `python {' '.join(sys.argv)}`\n\n" + table + "\n")
    return {n: statistics.median(v) for n, v in times.items()}


if __name__ == "__main__":
    main()
