"""Study tasks: what a model is trained on and how it is scored.

A task builds its data from a seed (nothing is downloaded), builds a model around
:class:`moegrad.MoE` layers for a given estimator, and knows its loss, its evaluation and, when
it can, a probe for the gradient diagnostics. Shapes: T tokens, D model dim, E experts, C classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import moegrad
from moegrad._checks import check_int


@dataclass
class Probe:
    """What :func:`moegrad.diagnostics.gradient_fidelity` needs: one MoE layer, its input
    x [T, D] and per-token losses loss_fn(y [T, D]) -> [T] of that layer's output."""

    moe: moegrad.MoE
    x: Tensor
    loss_fn: Callable[[Tensor], Tensor]


class Task:
    """Base class: ``name``, ``description``, ``has_truth`` (ground-truth routing known) and
    the methods below. ``seed`` fixes the data; the model seed is given to :meth:`build`."""

    name = ""
    description = ""
    has_truth = False
    #: the budget of ``--quick`` and of the default run: (steps, seeds)
    quick = (300, 2)
    full = (1500, 3)
    #: expert compute backend passed to every moegrad.MoE (see moegrad.experts.IMPLS)
    impl = "auto"

    def build(self, estimator: str, options: dict, losses: dict, seed: int) -> nn.Module:
        raise NotImplementedError

    def moes(self, model: nn.Module) -> list:
        return [m for m in model.modules() if isinstance(m, moegrad.MoE)]

    def reset(self) -> None:
        """Restart the training batch stream, so every run sees the same batches."""

    def batch(self, step: int):
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> tuple[Tensor, Tensor, list]:
        """-> (task loss, aux loss, [MoEOutput per layer])."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        raise NotImplementedError

    def probe(self, model: nn.Module) -> Optional[Probe]:
        return None

    def config(self) -> dict:
        return {}


class Clusters(Task):
    """C Gaussian clusters in R^D, each with its own teacher map; an MoE with E >= C experts.

    x = mu_c + sigma * eps for a class c drawn uniformly, eps ~ N(0, I_D); the centres mu_c are
    random directions of norm ``separation``. The target is teacher_c(x), where teacher_c is a
    random SwiGLU map of the experts' own shape (so one expert can fit one cluster exactly),
    scaled to unit mean square. Loss: mean_t ||y_t - target_t||^2 / D (1.0 = predicting zero).
    The model is one :class:`moegrad.MoE` layer (top-1 by default, weights w = s_i as in the
    Switch Transformer: the setting where the missing gradient of unselected experts bites
    hardest); its router starts at zero, so every expert
    scores the same and the first routing is blind to the clusters (purity at chance, 1/C):
    the router must learn the assignment from its gradient. Ground truth: the class c.
    """

    name = "clusters"
    description = "Gaussian clusters, one teacher map each; ground-truth routing known"
    has_truth = True
    quick = (800, 2)
    full = (3000, 3)

    def __init__(self, seed: int = 0, *, dim: int = 16, hidden_dim: int = 32, num_classes: int = 4,
                 num_experts: int = 8, top_k: int = 1, batch_size: int = 256,
                 separation: float = 3.0, sigma: float = 0.5, lr: float = 3e-3,
                 val_size: int = 2048) -> None:
        check_int("num_classes", num_classes, 1)
        check_int("num_experts", num_experts, num_classes)
        check_int("top_k", top_k, 1, num_experts)
        check_int("batch_size", batch_size, 1)
        self.dim, self.hidden_dim, self.num_classes = dim, hidden_dim, num_classes
        self.num_experts, self.top_k, self.batch_size = num_experts, top_k, batch_size
        self.separation, self.sigma, self.lr, self.seed = separation, sigma, lr, seed
        g = torch.Generator().manual_seed(10_000 + seed)
        centres = torch.randn(num_classes, dim, generator=g)
        self.centres = separation * centres / centres.norm(dim=1, keepdim=True)  # [C, D]
        bound_in, bound_h = 1 / math.sqrt(dim), 1 / math.sqrt(hidden_dim)
        self.w1 = (torch.rand(num_classes, hidden_dim, dim, generator=g) * 2 - 1) * bound_in
        self.w3 = (torch.rand(num_classes, hidden_dim, dim, generator=g) * 2 - 1) * bound_in
        self.w2 = (torch.rand(num_classes, dim, hidden_dim, generator=g) * 2 - 1) * bound_h
        x, c = self._sample(4096, g)
        raw = self._teach(x, c)
        self.scale = float(raw.pow(2).mean().rsqrt())
        self.val = self._sample(val_size, g)
        self.val_target = self._teach(*self.val)
        self.reset()

    def reset(self) -> None:
        self._g = torch.Generator().manual_seed(20_000 + self.seed)

    def config(self) -> dict:
        return {k: getattr(self, k) for k in ("dim", "hidden_dim", "num_classes", "num_experts",
                                               "top_k", "batch_size", "separation", "sigma", "lr")}

    def _sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        c = torch.randint(self.num_classes, (n,), generator=g)
        x = self.centres[c] + self.sigma * torch.randn(n, self.dim, generator=g)
        return x, c

    def _teach(self, x: Tensor, c: Tensor) -> Tensor:
        """teacher_c(x) [T, D] for each token's class."""
        h = F.silu(torch.einsum("td,thd->th", x, self.w1[c])) * torch.einsum("td,thd->th", x, self.w3[c])
        out = torch.einsum("th,tdh->td", h, self.w2[c])
        return out * getattr(self, "scale", 1.0)

    def build(self, estimator, options, losses, seed):
        torch.manual_seed(seed)
        model = moegrad.MoE(self.dim, self.hidden_dim, self.num_experts, self.top_k,
                            estimator=estimator, losses=losses, impl=self.impl, **options)
        nn.init.zeros_(model.router.gate.weight)
        return model

    def batch(self, step):
        x, c = self._sample(self.batch_size, self._g)
        return x, c, self._teach(x, c)

    def loss(self, model, batch):
        x, _, target = batch
        out = model(x)
        return ((out.y - target) ** 2).mean(), out.aux_loss, [out]

    @torch.no_grad()
    def evaluate(self, model):
        from moegrad.diagnostics import purity

        was = model.training
        model.eval()
        x, c = self.val
        out = model(x)
        model.train(was)
        loss = float(((out.y - self.val_target) ** 2).mean())
        return {"val_loss": loss,
                "purity": purity(out.routing.indices[:, 0], c, self.num_experts, self.num_classes)}

    def probe(self, model):
        x, c = self.val[0][:256], self.val[1][:256]
        target = self.val_target[:256]
        return Probe(model, x, lambda y: ((y - target.to(y.dtype)) ** 2).mean(-1))

    def truth(self, batch) -> Tensor:
        return batch[1]


TASKS: dict[str, type[Task]] = {"clusters": Clusters}


def get_task(name: str) -> type[Task]:
    from moegrad.study.charlm import CharLM  # noqa: F401  (registers itself)

    if name not in TASKS:
        raise ValueError(f"task={name!r} is unknown; choose one of {sorted(TASKS)}")
    return TASKS[name]
