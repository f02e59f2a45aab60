"""``charlm``: a tiny character-level transformer LM whose FFNs are :class:`moegrad.MoE`.

The text is the help topics that ship with CPython (``pydoc_data.topics``), so nothing is
downloaded; the last 10% of the characters are the validation split. The fine-tuning
distribution (:meth:`CharLM.shifted`) is Python source code of the standard library
(:data:`STDLIB_MODULES`), read from the interpreter's own files. Shapes: B batch, S context,
D model dim, V vocabulary.
"""

from __future__ import annotations

import importlib
import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import moegrad
from moegrad._checks import check_choice, check_float, check_int
from moegrad.study.task import ROUTER_INITS, Task

#: standard-library modules whose source (``inspect.getsource``, in this order) is the
#: fine-tuning text of ``charlm``: about 0.65M characters of Python code on CPython 3.11
STDLIB_MODULES = ("argparse", "dataclasses", "difflib", "fractions", "heapq", "inspect",
                  "pathlib", "statistics", "textwrap", "typing")
CORPORA = ("pydoc", "stdlib")


def load_text(corpus: str = "pydoc") -> str:
    """``"pydoc"``: the pydoc help topics as one string (about 0.5M characters, CPython's own
    docs); ``"stdlib"``: the source of :data:`STDLIB_MODULES` joined by blank lines."""
    check_choice("corpus", corpus, CORPORA)
    if corpus == "stdlib":
        return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in STDLIB_MODULES)
    # imported here, not at the top: pydoc_data.topics is 0.5 MB of data read only by this
    # corpus, and stripped-down Python builds may lack it; the task table (hence this module)
    # is imported by ``moegrad --help`` and by the clusters task, which must not need it
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)); x + MoE(LN(x))."""

    def __init__(self, dim: int, heads: int, moe: moegrad.MoE) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.moe = moe

    def forward(self, x: Tensor) -> tuple[Tensor, moegrad.MoEOutput]:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        out = self.moe(self.ln2(x))
        return x + out.y, out


class CharModel(nn.Module):
    """Token + position embeddings, ``layers`` blocks, LN and a tied output head."""

    def __init__(self, vocab: int, context: int, dim: int, heads: int, layers: int, make_moe) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, make_moe()) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: Tensor) -> tuple[Tensor, list]:
        """idx [B, S] int64 -> logits [B, S, V], [MoEOutput per layer]."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        outs = []
        for block in self.blocks:
            x, out = block(x)
            outs.append(out)
        return self.ln(x) @ self.tok.weight.T, outs


class CharLM(Task):
    """Next-character prediction on CPython's help topics; scored by validation loss (nats)
    and bits per character (= loss / ln 2). No ground-truth routing: purity is not defined and
    the exact expected gradient is not enumerable (tokens interact through attention), so the
    gradient diagnostics are reported for ``clusters`` only."""

    name = "charlm"
    description = "tiny char-level transformer LM on pydoc_data.topics"
    quick = (100, 2)
    full = (800, 5)
    moe_input_grad = True

    def __init__(self, seed: int = 0, *, dim: int = 48, heads: int = 4, layers: int = 2,
                 context: int = 32, num_experts: int = 8, top_k: int = 2,
                 hidden_dim: int | None = None, batch_size: int = 16, lr: float = 3e-3,
                 val_batches: int = 8, router_init: str = "uniform",
                 corpus: str = "pydoc") -> None:
        check_int("layers", layers, 1)
        check_int("heads", heads, 1)
        check_int("dim", dim, heads)
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        check_int("num_experts", num_experts, 1)
        check_int("top_k", top_k, 1, num_experts)
        check_float("lr", lr, low=0.0, low_open=True)
        check_choice("router_init", router_init, ROUTER_INITS)
        check_choice("corpus", corpus, CORPORA)
        pretrain = load_text("pydoc")
        chars = sorted(set(pretrain))  # one vocabulary for both corpora: the pydoc text's
        self.stoi = {c: i for i, c in enumerate(chars)}
        text = pretrain if corpus == "pydoc" else load_text(corpus)
        # characters outside the vocabulary (rare in source code) are left out
        data = torch.tensor([self.stoi[c] for c in text if c in self.stoi], dtype=torch.int64)
        split = int(0.9 * len(data))
        self.train_data, self.val_data = data[:split], data[split:]
        self.vocab = len(chars)
        hidden_dim = dim if hidden_dim is None else hidden_dim
        self.dim, self.heads, self.layers, self.context = dim, heads, layers, context
        self.num_experts, self.top_k, self.hidden_dim = num_experts, top_k, hidden_dim
        self.batch_size, self.lr, self.seed = batch_size, lr, seed
        self.router_init, self.corpus = router_init, corpus
        self.reset()
        vg = torch.Generator().manual_seed(40_000)
        self.val = [self._window(self.val_data, batch_size, vg) for _ in range(val_batches)]

    def stream_seed(self) -> int:
        return 30_000 + self.seed + (0 if self.corpus == "pydoc" else 5_000)

    def config(self) -> dict:
        return {k: getattr(self, k) for k in ("vocab", "dim", "heads", "layers", "context",
                                               "num_experts", "top_k", "hidden_dim",
                                               "batch_size", "lr", "router_init", "corpus")}

    def settings(self) -> dict:
        return {**super().settings(), "layers": self.layers, "dim": self.dim}

    def shifted(self) -> "CharLM":
        """The same model shapes and vocabulary on standard-library source code
        (:data:`STDLIB_MODULES`) instead of the help topics."""
        new = type(self)(self.seed, dim=self.dim, heads=self.heads, layers=self.layers,
                         context=self.context, num_experts=self.num_experts, top_k=self.top_k,
                         hidden_dim=self.hidden_dim, batch_size=self.batch_size, lr=self.lr,
                         val_batches=len(self.val), router_init=self.router_init,
                         corpus="stdlib")
        new.impl, new.routing = self.impl, self.routing
        new.selection_bias, new.balancer = self.selection_bias, self.balancer
        return new

    def val_inputs(self) -> list:
        return [idx for idx, _ in self.val]

    def backbone_flops(self, batch) -> int:
        """Attention block and tied head per step: per token and layer the q/k/v and output
        projections (4 D^2 multiply-adds), the attention products QK^T and PV over the whole
        S x S square (2 S D; the causal mask is applied to the full square), and per token the
        head (D V); forward 1x, backward 2x (input and weight gradients; attention: the
        gradients of both operands), 2 FLOPs per multiply-add. Embedding lookups, layer norms,
        softmax and the loss are not matrix products and are not counted."""
        idx = batch[0]
        b, s = idx.shape
        tokens = b * s
        per_layer = tokens * 4 * self.dim * self.dim + 2 * b * s * s * self.dim
        return 2 * 3 * (self.layers * per_layer + tokens * self.dim * self.vocab)

    def _window(self, data: Tensor, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        start = torch.randint(len(data) - self.context - 1, (n,), generator=g)
        rows = torch.stack([data[s:s + self.context + 1] for s in start.tolist()])
        return rows[:, :-1], rows[:, 1:]

    def build(self, estimator, options, losses, seed):
        torch.manual_seed(seed)
        make = lambda: moegrad.MoE(self.dim, self.hidden_dim, self.num_experts, self.top_k,  # noqa: E731
                                   losses=losses, **self.layer_kwargs(estimator), **options)
        model = CharModel(self.vocab, self.context, self.dim, self.heads, self.layers, make)
        return self.init_routers(model)

    def draw(self, g):
        return self._window(self.train_data, self.batch_size, g)

    def loss(self, model, batch):
        idx, target = batch
        logits, outs = model(idx)
        loss = F.cross_entropy(logits.reshape(-1, self.vocab), target.reshape(-1))
        return loss, sum(o.aux_loss for o in outs), outs

    @torch.no_grad()
    def evaluate(self, model):
        was = model.training
        model.eval()
        total = sum(float(self.loss(model, b)[0]) for b in self.val) / len(self.val)
        model.train(was)
        return {"val_loss": total, "bits_per_char": total / math.log(2)}
