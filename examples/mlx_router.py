"""Router-only fine-tuning of a tiny random mlx-lm MoE model: stock routing vs moegrad's ``dense``.

Stock mlx-lm routes with ``stop_gradient(argpartition(...))`` and, for Mixtral, weights the
selected experts by the softmax of their logits. With top-1 that weight is exactly 1, so the
router gets no gradient: training only the routers leaves the loss where it was (Qwen3-MoE's
s / sum(s) is 1 up to rounding, and Adam turns that rounding noise into tiny random steps). Patching the
blocks with ``moegrad.mlx.lm.patch(model, estimator="dense")`` keeps the forward and gives the
routers the dense straight-through gradient, and the same training lowers the loss.

    python examples/mlx_router.py --family mixtral --steps 40
    python examples/mlx_router.py --family qwen3_moe --top-k 1 --steps 40

Nothing is downloaded: the models are built from tiny random configurations.
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from moegrad.mlx import lm


def tiny_model(family: str, top_k: int, experts: int = 4, seed: int = 0):
    """A 2-layer random Mixtral or Qwen3-MoE (vocab 64, hidden 32)."""
    mx.random.seed(seed)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=top_k, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False)
    if family == "mixtral":
        from mlx_lm.models import mixtral
        return mixtral.Model(mixtral.ModelArgs(model_type="mixtral", intermediate_size=48,
                                               num_local_experts=experts, **common))
    if family == "qwen3_moe":
        from mlx_lm.models import qwen3_moe
        return qwen3_moe.Model(qwen3_moe.ModelArgs(
            model_type="qwen3_moe", intermediate_size=48, moe_intermediate_size=48,
            num_experts=experts, decoder_sparse_step=1, mlp_only_layers=[], head_dim=8,
            max_position_embeddings=128, norm_topk_prob=True, **common))
    raise ValueError(f"family={family!r} is not supported; choose 'mixtral' or 'qwen3_moe'")


def train_routers(model, tokens, steps: int, lr: float = 3e-2) -> list:
    """Adam on the router gates only (everything else frozen); next-token CE on a fixed batch.
    Returns the loss before each step and after the last."""
    model.freeze()
    model.apply_to_modules(lambda name, m: m.unfreeze(keys=["weight"], recurse=False)
                           if name.endswith(".gate") else None)
    assert all(k.endswith("gate.weight") for k, _ in tree_flatten(model.trainable_parameters()))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_fn(m):
        return nn.losses.cross_entropy(m(inputs), targets, reduction="mean") + lm.aux_loss(m)

    step = nn.value_and_grad(model, loss_fn)
    opt = optim.Adam(learning_rate=lr)
    losses = []
    for _ in range(steps):
        loss, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        losses.append(loss.item())
    losses.append(loss_fn(model).item())
    return losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="mixtral", choices=["mixtral", "qwen3_moe"])
    p.add_argument("--top-k", type=int, default=1, help="experts per token (1 shows the failure)")
    p.add_argument("--steps", type=int, default=40, help="Adam steps on the router gates")
    p.add_argument("--estimator", default="dense", help="moegrad estimator for the patched run")
    args = p.parse_args(argv)
    tokens = mx.random.randint(0, 64, (8, 33), key=mx.random.key(1))
    for label, estimator in (("stock mlx-lm", None), (f"moegrad {args.estimator}", args.estimator)):
        model = tiny_model(args.family, args.top_k)
        if estimator is not None:
            lm.patch(model, estimator=estimator)
        losses = train_routers(model, tokens, args.steps)
        print(f"{label:>20}: loss {losses[0]:.4f} -> {losses[-1]:.4f} "
              f"(change {losses[-1] - losses[0]:+.4f}) after {args.steps} router-only steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
