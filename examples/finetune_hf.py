"""Train a small random-init Qwen3-MoE (transformers) with different router gradient estimators.

No download: the model is built from a config and the text is the Python documentation topics
shipped with Python (``pydoc_data.topics``), tokenised as bytes (vocabulary 256). Each estimator
starts from the same weights and sees the same batches; ``moegrad.hf.patch`` changes only how the
router learns (the forward of ``topk``, ``dense`` and ``default_moe`` is the same; the model is
random-init, so estimators that change the forward are allowed with ``allow_forward_change``).

    python examples/finetune_hf.py --steps 300 --out finetune_hf.png
    python examples/finetune_hf.py --steps 5 --estimators topk,dense   # a quick check
    python examples/finetune_hf.py --steps 30 --trainer   # transformers.Trainer + RoutingCallback

Prints the training loss (mean of the last 10% of steps), the held-out loss and the routing
health of the last ``--log-every`` steps (mean over layers of load CV and max violation, dead
experts: :class:`moegrad.diagnostics.RoutingMonitor`) per estimator, and plots the training
curves (matplotlib, Agg backend) to the PNG file ``--out`` (default ``finetune_hf.png`` in the
current directory). ``--trainer`` trains with ``transformers.Trainer`` and
:class:`moegrad.hf.RoutingCallback`, which puts the routing health in Trainer's own logs
(``report_to``: TensorBoard, W&B, ...); its curve is Trainer's logged loss, the LM loss plus
``--aux`` times the router aux loss.
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def load_text() -> bytes:
    """The pydoc topics text as UTF-8 bytes (about 1 MB, ships with CPython)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def batches(data: torch.Tensor, batch: int, seq: int, steps: int, seed: int):
    """``steps`` random windows [batch, seq] from ``data`` [N] (uint8 as int64), seeded."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        yield torch.stack([data[s:s + seq] for s in starts.tolist()])


def build_model(args):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=args.dim, intermediate_size=2 * args.dim,
                         moe_intermediate_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=args.dim // 4,
                         num_experts=args.experts, num_experts_per_tok=args.top_k,
                         norm_topk_prob=args.top_k == 1 or args.normalize,
                         router_aux_loss_coef=args.aux, max_position_embeddings=args.seq,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(args.seed)
    return Qwen3MoeForCausalLM(cfg).float()


def train_loop(model, estimator: str, args, data_train) -> tuple:
    """The plain PyTorch loop: (LM losses per step, RoutingMonitor reads every --log-every steps)."""
    from tqdm import tqdm

    from moegrad.diagnostics import RoutingMonitor

    monitor = RoutingMonitor(model)  # forward hooks: no extra forward pass
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    losses, routing = [], []
    for step, x in enumerate(tqdm(batches(data_train, args.batch, args.seq, args.steps, args.seed + 1),
                                  total=args.steps, desc=estimator, leave=False, disable=args.quiet), 1):
        out = model(x, labels=x, output_router_logits=args.aux > 0)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        lm = out.loss - args.aux * out.aux_loss if args.aux > 0 else out.loss
        losses.append(float(lm.detach()))
        if step % args.log_every == 0 or step == args.steps:
            routing.append(monitor.read())
    monitor.remove()
    return losses, routing


def train_trainer(model, args, data_train, out_dir: str) -> tuple:
    """transformers.Trainer with moegrad.hf.RoutingCallback: (logged losses, routing logs)."""
    import transformers

    import moegrad.hf

    class Windows(torch.utils.data.Dataset):
        def __init__(self):
            self.rows = torch.cat(list(batches(data_train, args.batch, args.seq, args.steps, args.seed + 1)))

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return {"input_ids": self.rows[i], "labels": self.rows[i]}

    model.config.output_router_logits = args.aux > 0
    targs = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=args.quiet, seed=args.seed)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=Windows())
    moegrad.hf.RoutingCallback(model).attach(trainer)  # first: report_to callbacks log its values
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    routing = [{k: v for k, v in e.items() if k.startswith("moe/")} for e in logs]
    return [e["loss"] for e in logs], routing[args.log_every - 1::args.log_every] or routing[-1:]


def routing_summary(values: dict) -> str:
    """Mean over layers of load CV and max violation, and the dead experts, of one read."""
    def mean(metric):
        found = [v for k, v in values.items() if k.endswith("/" + metric)]
        return sum(found) / max(1, len(found))
    dead = sum(v for k, v in values.items() if k.endswith("/dead_experts"))
    return f"load CV {mean('load_cv'):.3f}  max violation {mean('max_violation'):.3f}  dead experts {dead:.0f}"


def train_one(estimator: str, args, data_train, data_val) -> dict:
    import tempfile

    import moegrad.hf

    model = build_model(args)
    # random init: there is no pretrained forward to keep, so estimators whose forward differs
    # from Qwen3-MoE's (unweighted, sparsemixer, ... with K > 1) are accepted too
    moegrad.hf.patch(model, estimator, allow_forward_change=True)
    model.train()
    start = time.perf_counter()
    if args.trainer:
        with tempfile.TemporaryDirectory() as out_dir:
            losses, routing = train_trainer(model, args, data_train, out_dir)
    else:
        losses, routing = train_loop(model, estimator, args, data_train)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        val = [float(model(x, labels=x).loss)
               for x in batches(data_val, args.batch, args.seq, args.eval_batches, args.seed + 2)]
    tail = max(1, len(losses) // 10)
    return {"losses": losses, "train": sum(losses[-tail:]) / tail, "val": sum(val) / len(val),
            "seconds": seconds, "routing": routing}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per estimator (default 300)")
    p.add_argument("--estimators", default="topk,dense,default_moe",
                   help="comma-separated moegrad estimator names (default topk,dense,default_moe)")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--seq", type=int, default=64, help="bytes per sequence (default 64)")
    p.add_argument("--dim", type=int, default=64, help="hidden size D (default 64)")
    p.add_argument("--hidden", type=int, default=64, help="expert intermediate size H (default 64)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--experts", type=int, default=8, help="routed experts E (default 8)")
    p.add_argument("--top-k", type=int, default=1, help="experts per token K (default 1: top-1 "
                   "renormalised, where topk gives the router no task gradient)")
    p.add_argument("--normalize", action="store_true", help="norm_topk_prob for K > 1")
    p.add_argument("--aux", type=float, default=0.01, help="HF router_aux_loss_coef (default 0.01, 0 = off)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and batches (default 0)")
    p.add_argument("--out", default="finetune_hf.png",
                   help="where the PNG plot of the training curves is written (default finetune_hf.png "
                        "in the current directory; '' = no plot)")
    p.add_argument("--trainer", action="store_true",
                   help="train with transformers.Trainer and moegrad.hf.RoutingCallback instead of the plain loop")
    p.add_argument("--log-every", type=int, default=50,
                   help="steps per routing-health read (RoutingMonitor; default 50)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.log_every < 1:
        p.error(f"--log-every must be >= 1, got {args.log_every}")
    names = [n.strip() for n in args.estimators.split(",") if n.strip()]
    import moegrad.estimators

    unknown = [n for n in names if n not in moegrad.estimators.available()]
    if unknown or not names:
        p.error(f"--estimators {unknown or names} unknown; choose from {moegrad.estimators.available()}")

    text = torch.frombuffer(bytearray(load_text()), dtype=torch.uint8).long()
    cut = int(0.9 * text.numel())
    data_train, data_val = text[:cut], text[cut:]
    results = {}
    for name in names:
        results[name] = train_one(name, args, data_train, data_val)
        r = results[name]
        print(f"{name:>16}: train loss {r['train']:.4f}  val loss {r['val']:.4f}  "
              f"(ppl {math.exp(r['val']):.2f})  {r['seconds']:.1f}s")
        print(f"{'':>16}  routing, last read: {routing_summary(r['routing'][-1])}")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, r in results.items():
            k = max(1, len(r["losses"]) // 50)  # moving average over k steps for readability
            smooth = torch.tensor(r["losses"]).unfold(0, k, 1).mean(1)
            ax.plot(range(k - 1, k - 1 + len(smooth)), smooth.tolist(),
                    label=f"{name} (val {r['val']:.3f})")
        ax.set_xlabel("step")
        ax.set_ylabel("Trainer loss (LM + aux, nats/byte)" if args.trainer else "train LM loss (nats/byte)")
        ax.set_title(f"Qwen3-MoE E={args.experts} K={args.top_k} on pydoc topics")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        plt.close(fig)
        print(f"plot written to {args.out}")
    return results


if __name__ == "__main__":
    main()
