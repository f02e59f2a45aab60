"""Train a small MoE model with its experts sharded over processes (expert parallelism).

    torchrun --nproc_per_node=2 examples/expert_parallel.py
    torchrun --nproc_per_node=4 examples/expert_parallel.py --estimator dense --steps 100
    torchrun --nproc_per_node=2 examples/expert_parallel.py --micro-batches 4

Backend: NCCL when CUDA is present (one GPU per process), gloo on the CPU otherwise. Every rank
draws its own batch (data parallel over tokens); rank r holds experts [r E/W, (r+1) E/W) of each
MoE layer and the routers and other weights are replicated:

* ``moegrad.distributed.expert_parallel(layer, group)`` shards each layer; tokens travel to
  their experts and back with all_to_all_single, gradients too;
* DistributedDataParallel averages the replicated gradients; the sharded expert weights are
  hidden from it (``ddp_ignore_experts``) and their gradient, summed over ranks by the exchange,
  is averaged with ``average_expert_grads`` so every parameter follows the same objective (the
  mean over ranks of the per-rank losses). The balance losses use global counts: their mean over
  ranks is the loss of the whole global batch, with no factor W;
* ``--micro-batches M`` accumulates gradients over M micro-batches per optimizer step (DDP's
  ``no_sync`` until the last one). A ``moegrad.BalanceWindow`` makes the switch loss's
  expert fractions f count every micro-batch of the step on every rank (the global batch, as in
  Qwen's global-batch balancing), each micro-batch's loss is divided by M like the task loss, and
  ``window.reset()`` follows ``optimizer.step()``;
* the model is built from ``--seed`` on every rank (identical), then each rank reseeds with
  seed + rank so that sampling estimators (gumbel, noisy_topk, sparsemixer) draw independent noise;
* at the end the sharded model is gathered into the single-process layout
  (``full_state_dict``), loaded into a plain model, and checked to give the same outputs;
  ``--save PATH`` writes that state dict from rank 0.

A fixed random teacher (two MoE layers) gives the targets; the printed loss is the mean over
ranks of the relative mean squared error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import moegrad
from moegrad.distributed import (average_expert_grads, ddp_ignore_experts, expert_parallel,
                                 full_state_dict)


class Model(nn.Module):
    """x [B, S, D] -> [B, S, D]: an input projection, then ``layers`` residual MoE blocks."""

    def __init__(self, dim: int, hidden: int, experts: int, top_k: int, layers: int, **moe_options):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.moes = nn.ModuleList(moegrad.MoE(dim, hidden, experts, top_k, **moe_options)
                                  for _ in range(layers))

    def forward(self, x):
        h = self.proj(x)
        aux = h.new_zeros(())
        for norm, moe in zip(self.norms, self.moes):
            out = moe(norm(h))
            h = h + out.y
            aux = aux + out.aux_loss
        return h, aux


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimator", default="topk", choices=moegrad.estimators.available(),
                        help="router gradient estimator (default: topk)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default: 60)")
    parser.add_argument("--experts", type=int, default=8,
                        help="experts per layer, a multiple of the number of processes (default: 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default: 2)")
    parser.add_argument("--dim", type=int, default=32, help="model dimension (default: 32)")
    parser.add_argument("--batch", type=int, default=8,
                        help="sequences per rank and micro-batch (default: 8)")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="micro-batches accumulated per optimizer step (default: 1)")
    parser.add_argument("--seed", type=int, default=0,
                        help="model seed; rank r then reseeds with seed + r (default: 0)")
    parser.add_argument("--seq", type=int, default=16, help="tokens per sequence (default: 16)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="expert capacity factor, applied per rank (default: dropless)")
    parser.add_argument("--save", default=None, help="write the gathered state dict here (rank 0)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds before a stuck collective fails (default: 120)")
    args = parser.parse_args(argv)
    for name in ("steps", "micro_batches", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def init_distributed(timeout: float, launch: str) -> tuple:
    """The torchrun process group: NCCL with one GPU per process when CUDA is present, gloo on
    the CPU (the cores shared out between the processes) -> (device, rank, world). ``launch``:
    the command to suggest when the script was not started by torchrun."""
    if "RANK" not in os.environ:
        raise SystemExit(f"launch with torchrun, e.g.: {launch}")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return device, rank, world


def main(argv=None) -> float:
    args = parse_args(argv)
    device, rank, world = init_distributed(
        args.timeout, "torchrun --nproc_per_node=2 examples/expert_parallel.py")
    # the token exchange gets its own communicator, so it never interleaves with DDP's all-reduces
    ep_group = dist.new_group(list(range(world)))

    torch.manual_seed(args.seed)  # identical construction on every rank
    options = dict(estimator=args.estimator, capacity_factor=args.capacity_factor,
                   losses={"switch": 1e-2, **({"importance_load": 1e-2} if args.estimator == "noisy_topk" else {})})
    teacher = Model(args.dim, 2 * args.dim, args.experts, args.top_k, 2).to(device).eval()
    with torch.no_grad():
        for moe in teacher.moes:
            moe.router.gate.weight.mul_(4.0)  # decisive routing
    model = Model(args.dim, 2 * args.dim, args.experts, args.top_k, 2, **options).to(device)
    for moe in model.moes:
        expert_parallel(moe, ep_group)
    ignored = ddp_ignore_experts(model)
    # buffers (load counts, default_moe's EMA) are kept consistent by moegrad, not by DDP
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    ddp = DDP(model, **no_sync)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    # switch-loss counts over every micro-batch of a step, all ranks (registered buffers)
    window = moegrad.BalanceWindow(model) if args.micro_batches > 1 else None
    torch.manual_seed(args.seed + rank)  # the model is built: independent sampling noise per rank
    if rank == 0:
        print(f"{world} processes ({dist.get_backend()}), {args.experts} experts per layer, "
              f"{args.experts // world} per rank; {len(ignored)} expert tensors kept out of DDP; "
              f"estimator={args.estimator!r}, {args.micro_batches} micro-batch(es) per step", flush=True)

    gen = torch.Generator().manual_seed(1000 + rank)  # each rank draws its own batches
    start, first, loss_value = time.perf_counter(), None, None
    micro = args.micro_batches
    for step in range(1, args.steps + 1):
        opt.zero_grad(set_to_none=True)
        report = torch.zeros(2, device=device)
        for m in range(micro):
            x = torch.randn(args.batch, args.seq, args.dim, generator=gen).to(device)
            with torch.no_grad():
                target = teacher(x)[0]
            # DDP all-reduces the replicated gradients once, after the last micro-batch
            with ddp.no_sync() if m < micro - 1 else contextlib.nullcontext():
                y, aux = ddp(x)
                loss = F.mse_loss(y, target) / target.var()
                ((loss + aux) / micro).backward()  # aux scaled like the task loss: no factor W or M
            report += torch.stack([loss.detach(), aux.detach()]) / micro
        average_expert_grads(model)
        opt.step()
        if window is not None:
            window.reset()
        dist.all_reduce(report)
        report /= world
        loss_value = float(report[0])
        first = loss_value if first is None else first
        if rank == 0 and (step == 1 or step % max(1, args.steps // 6) == 0 or step == args.steps):
            print(f"step {step:4d}  relative mse {loss_value:.4f}  aux {float(report[1]):.4f}", flush=True)

    # gather the experts into the single-process layout and check a plain model agrees
    model.eval()
    full = full_state_dict(model)
    plain = Model(args.dim, 2 * args.dim, args.experts, args.top_k, 2, **options).to(device).eval()
    plain.load_state_dict(full)
    with torch.no_grad():
        x = torch.randn(2, args.seq, args.dim, generator=gen).to(device)
        diff = (model(x)[0] - plain(x)[0]).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"done in {time.perf_counter() - start:.1f}s: relative mse {first:.4f} -> {loss_value:.4f}; "
              f"gathered model vs expert-parallel model max |diff| {float(diff):.2e}", flush=True)
        if args.save:
            torch.save(full, args.save)
            print(f"saved the gathered state dict to {args.save}")
    dist.barrier()  # every rank done; the process group ends with the process (see __main__)
    return loss_value


if __name__ == "__main__":
    main()
    # leave without destroying the process group or tearing the interpreter down: with gloo, a
    # finished rank sometimes hangs (or aborts) there in its communication threads after the
    # other ranks have left, and torchrun would wait for it forever
    sys.stdout.flush()
    os._exit(0)
