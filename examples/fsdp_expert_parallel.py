"""Train a small MoE model with FSDP2 and expert parallelism on a dp x ep mesh, then checkpoint it.

    torchrun --nproc_per_node=4 examples/fsdp_expert_parallel.py
    torchrun --nproc_per_node=4 examples/fsdp_expert_parallel.py --ep 4 --steps 50
    torchrun --nproc_per_node=2 examples/fsdp_expert_parallel.py --ep 1

Backend: NCCL when CUDA is present (one GPU per process), gloo on the CPU otherwise. The
``world / ep`` x ``ep`` mesh (``init_device_mesh(device, (dp, ep), mesh_dim_names=("dp", "ep"))``)
is given to ``moegrad.fsdp.expert_parallel_fsdp``:

* each MoE layer's experts are split over ``ep`` (rank (d, e) runs experts [e E/ep, (e+1) E/ep),
  tokens travel with all_to_all_single) and FSDP2-sharded over ``dp``;
* the rest (projection, norms, routers) is FSDP2-sharded over all ranks;
* the gradients are those of the global batch's mean loss (FSDP averages over all ranks, the
  experts' reduce-scatter over dp divides by all ranks too, as their gradient already sums the
  ep ranks' tokens), and the balance losses count every rank's tokens; no extra factor.

Every rank draws its own batch. After ``--steps`` AdamW steps, the model and optimizer are saved
with ``moegrad.fsdp.save_checkpoint`` (torch.distributed.checkpoint; each expert stored once as
part of its global [E, ...] tensor), loaded into a freshly built sharded model and optimizer,
and the next step is run on both: the printed losses agree. A fixed random teacher (two MoE
layers) gives the targets; the printed loss is the mean over ranks of the relative mean squared
error.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import moegrad
from moegrad.fsdp import expert_parallel_fsdp, load_checkpoint, save_checkpoint

# the residual MoE model and the torchrun set-up of examples/expert_parallel.py (this script's
# directory is on sys.path)
from expert_parallel import Model, init_distributed  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, default=2,
                        help="expert-parallel size, dividing the number of processes (default: 2)")
    parser.add_argument("--estimator", default="topk",
                        choices=[e for e in moegrad.estimators.available() if e != "dense"],
                        help="router gradient estimator (default: topk)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (default: 10)")
    parser.add_argument("--experts", type=int, default=8,
                        help="experts per layer, a multiple of --ep (default: 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default: 2)")
    parser.add_argument("--dim", type=int, default=32, help="model dimension (default: 32)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank (default: 8)")
    parser.add_argument("--seq", type=int, default=16, help="tokens per sequence (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="model seed (default: 0)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint directory (default: a temporary one, removed at the end)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds before a stuck collective fails (default: 120)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "ep"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> float:
    args = parse_args(argv)
    device, rank, world = init_distributed(
        args.timeout, "torchrun --nproc_per_node=4 examples/fsdp_expert_parallel.py")
    if world % args.ep:
        raise SystemExit(f"--ep {args.ep} must divide the number of processes {world}")
    mesh = init_device_mesh(device.type, (world // args.ep, args.ep), mesh_dim_names=("dp", "ep"))
    options = dict(estimator=args.estimator, losses={"switch": 1e-2, "z_loss": 1e-3})

    def build(seed):
        torch.manual_seed(seed)  # identical construction on every rank
        model = Model(args.dim, 2 * args.dim, args.experts, args.top_k, 2, **options).to(device)
        expert_parallel_fsdp(model, mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=args.lr)

    torch.manual_seed(args.seed + 1)
    teacher = Model(args.dim, 2 * args.dim, args.experts, args.top_k, 2).to(device).eval()
    with torch.no_grad():
        for moe in teacher.moes:
            moe.router.gate.weight.mul_(4.0)  # decisive routing
    model, opt = build(args.seed)
    torch.manual_seed(args.seed + 100 + rank)  # independent sampling noise per rank
    if rank == 0:
        print(f"{world} processes ({dist.get_backend()}): mesh dp={world // args.ep} x ep={args.ep}, "
              f"{args.experts} experts per layer, {args.experts // args.ep} per ep rank; "
              f"estimator={args.estimator!r}", flush=True)

    gen = torch.Generator().manual_seed(1000 + rank)  # each rank draws its own batches

    def batch():
        x = torch.randn(args.batch, args.seq, args.dim, generator=gen).to(device)
        with torch.no_grad():
            return x, teacher(x)[0]

    def step(m, o, x, target):
        y, aux = m(x)
        loss = F.mse_loss(y, target) / target.var()
        (loss + aux).backward()
        o.step()
        o.zero_grad(set_to_none=True)
        report = torch.stack([loss.detach(), aux.detach()])
        dist.all_reduce(report)
        return (report / world).tolist()

    start, first, loss_value = time.perf_counter(), None, None
    for i in range(1, args.steps + 1):
        loss_value, aux_value = step(model, opt, *batch())
        first = loss_value if first is None else first
        if rank == 0 and (i == 1 or i % max(1, args.steps // 5) == 0 or i == args.steps):
            print(f"step {i:4d}  relative mse {loss_value:.4f}  aux {aux_value:.4f}", flush=True)

    # checkpoint round-trip: the next step from the loaded copy equals the next step of the original
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or os.path.join(tmp, "checkpoint")
        if args.checkpoint is None:  # every rank must write to the same directory
            names = [None] * world
            dist.all_gather_object(names, path)
            path = names[0]
        save_checkpoint(model, opt, path)
        copy, copy_opt = build(args.seed + 7)  # different initial weights: only the load restores them
        load_checkpoint(copy, copy_opt, path)
        x, target = batch()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            continued = step(model, opt, x, target)[0]  # the RNG state is restored after it, so
        resumed = step(copy, copy_opt, x, target)[0]  # both draw the same noise (sampling estimators)
        dist.barrier()  # every rank done with the files before rank 0 removes the directory
    if rank == 0:
        print(f"done in {time.perf_counter() - start:.1f}s: relative mse {first:.4f} -> {loss_value:.4f}; "
              f"after the checkpoint round-trip the next step's loss is {resumed:.6f}, "
              f"continuing without it {continued:.6f} (|diff| {abs(resumed - continued):.1e})", flush=True)
    dist.barrier()  # every rank done; the process group ends with the process (see __main__)
    return resumed


if __name__ == "__main__":
    main()
    # leave without destroying the process group or tearing the interpreter down: with gloo, a
    # finished rank sometimes hangs (or aborts) there in its communication threads after the
    # other ranks have left, and torchrun would wait for it forever
    sys.stdout.flush()
    os._exit(0)
