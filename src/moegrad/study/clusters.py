"""``clusters``: C Gaussian clusters, one teacher map each, ground-truth routing known.

Shapes: T tokens, D model dim, H expert hidden dim, E experts, C classes (clusters).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor

import moegrad
from moegrad._checks import check_choice, check_float, check_int
from moegrad.study.task import ROUTER_INITS, Probe, Task, routed_purity


class Clusters(Task):
    """C Gaussian clusters in R^D, each with its own teacher map; an MoE with E >= C experts.

    x = mu_c + sigma * eps for a class c drawn uniformly, eps ~ N(0, I_D); the centres mu_c are
    random directions of norm ``separation``. The target is teacher_c(x), where teacher_c is a
    random SwiGLU map of the experts' own shape (so one expert can fit one cluster exactly),
    scaled to unit mean square. Loss: mean_t ||y_t - target_t||^2 / D (1.0 = predicting zero).
    The model is one :class:`moegrad.MoE` layer (top-1 by default, weights w = s_i as in the
    Switch Transformer: the setting where the missing gradient of unselected experts bites
    hardest); its router starts at zero by default (``router_init``), so every expert
    scores the same and the first routing is blind to the clusters (purity at chance, 1/C):
    the router must learn the assignment from its gradient. Ground truth: the class c.
    :meth:`shifted` gives the fine-tuning distribution (moved centres, new teachers).
    """

    name = "clusters"
    description = "Gaussian clusters, one teacher map each; ground-truth routing known"
    has_truth = True
    quick = (800, 2)
    full = (3000, 5)

    def __init__(self, seed: int = 0, *, dim: int = 16, hidden_dim: int = 32, num_classes: int = 4,
                 num_experts: int = 8, top_k: int = 1, batch_size: int = 256,
                 separation: float = 3.0, sigma: float = 0.5, lr: float = 3e-3,
                 val_size: int = 2048, router_init: str = "zero") -> None:
        check_int("num_classes", num_classes, 1)
        check_int("num_experts", num_experts, num_classes)
        check_int("top_k", top_k, 1, num_experts)
        check_int("batch_size", batch_size, 1)
        check_int("dim", dim, 1)
        check_float("lr", lr, low=0.0, low_open=True)
        check_choice("router_init", router_init, ROUTER_INITS)
        self.dim, self.hidden_dim, self.num_classes = dim, hidden_dim, num_classes
        self.num_experts, self.top_k, self.batch_size = num_experts, top_k, batch_size
        self.separation, self.sigma, self.lr, self.seed = separation, sigma, lr, seed
        self.router_init, self.shift = router_init, 0.0
        g = torch.Generator().manual_seed(10_000 + seed)
        centres = torch.randn(num_classes, dim, generator=g)
        self.centres = separation * centres / centres.norm(dim=1, keepdim=True)  # [C, D]
        bound_in, bound_h = 1 / math.sqrt(dim), 1 / math.sqrt(hidden_dim)
        self.w1 = (torch.rand(num_classes, hidden_dim, dim, generator=g) * 2 - 1) * bound_in
        self.w3 = (torch.rand(num_classes, hidden_dim, dim, generator=g) * 2 - 1) * bound_in
        self.w2 = (torch.rand(num_classes, dim, hidden_dim, generator=g) * 2 - 1) * bound_h
        self._finish(g, val_size)
        self._stream = 20_000 + seed
        self.reset()

    def stream_seed(self) -> int:
        return self._stream

    def _finish(self, g: torch.Generator, val_size: int) -> None:
        """Scale the teachers to unit mean square and draw the validation set."""
        self.scale = 1.0
        x, c = self._sample(4096, g)
        self.scale = float(self._teach(x, c).pow(2).mean().rsqrt())
        self.val = self._sample(val_size, g)
        self.val_target = self._teach(*self.val)

    def config(self) -> dict:
        return {k: getattr(self, k) for k in ("dim", "hidden_dim", "num_classes", "num_experts",
                                               "top_k", "batch_size", "separation", "sigma", "lr",
                                               "router_init", "shift")}

    def settings(self) -> dict:
        return {**super().settings(), "num_classes": self.num_classes, "dim": self.dim}

    def shifted(self, angle: float = math.pi / 4) -> "Clusters":
        """Moved centres and new teachers, both by ``angle`` (radians, default pi/4).

        Each centre turns by ``angle`` towards a fresh random direction orthogonal to it
        (mu'_c = |mu_c| (cos a u_c + sin a v_c), u_c = mu_c / |mu_c|, v_c a unit vector orthogonal
        to u_c), and each teacher weight becomes cos a * W + sin a * W' with W' a fresh draw of
        the same law, rescaled to unit mean square: the clusters and their maps are related to
        the pretraining ones (cosine cos a) but not equal, so a pretrained router starts
        partly right. Validation set and batch stream are new; shapes and seed are kept.
        """
        check_float("angle", angle, low=0.0, high=math.pi / 2)
        new = copy.copy(self)
        g = torch.Generator().manual_seed(60_000 + self.seed)
        u = self.centres / self.centres.norm(dim=1, keepdim=True)
        v = torch.randn(self.num_classes, self.dim, generator=g)
        v = v - (v * u).sum(1, keepdim=True) * u
        v = v / v.norm(dim=1, keepdim=True)
        new.centres = self.separation * (math.cos(angle) * u + math.sin(angle) * v)
        for name, bound in (("w1", 1 / math.sqrt(self.dim)), ("w3", 1 / math.sqrt(self.dim)),
                            ("w2", 1 / math.sqrt(self.hidden_dim))):
            w = getattr(self, name)
            fresh = (torch.rand(w.shape, generator=g) * 2 - 1) * bound
            setattr(new, name, math.cos(angle) * w + math.sin(angle) * fresh)
        new._finish(g, len(self.val[0]))
        new.shift, new._stream = angle, 70_000 + self.seed
        new.new_stream()
        return new

    def val_inputs(self) -> list:
        return list(self.val[0].split(512))

    def _sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        c = torch.randint(self.num_classes, (n,), generator=g)
        x = self.centres[c] + self.sigma * torch.randn(n, self.dim, generator=g)
        return x, c

    def _teach(self, x: Tensor, c: Tensor) -> Tensor:
        """teacher_c(x) [T, D] for each token's class."""
        h = F.silu(torch.einsum("td,thd->th", x, self.w1[c])) * torch.einsum("td,thd->th", x, self.w3[c])
        out = torch.einsum("th,tdh->td", h, self.w2[c])
        return out * self.scale

    def build(self, estimator, options, losses, seed):
        torch.manual_seed(seed)
        model = moegrad.MoE(self.dim, self.hidden_dim, self.num_experts, self.top_k,
                            losses=losses, **self.layer_kwargs(estimator), **options)
        return self.init_routers(model)

    def draw(self, g):
        x, c = self._sample(self.batch_size, g)
        return x, c, self._teach(x, c)

    def loss(self, model, batch):
        x, _, target = batch
        out = model(x)
        return ((out.y - target) ** 2).mean(), out.aux_loss, [out]

    @torch.no_grad()
    def evaluate(self, model):
        was = model.training
        model.eval()
        x, c = self.val
        out = model(x)
        model.train(was)
        loss = float(((out.y - self.val_target) ** 2).mean())
        return {"val_loss": loss,
                "purity": routed_purity(out.routing, c, self.num_experts, self.num_classes)}

    def probe(self, model):
        x = self.val[0][:256]
        target = self.val_target[:256]
        return Probe(model, x, lambda y: ((y - target.to(y.dtype)) ** 2).mean(-1))

    def truth(self, batch) -> Tensor:
        return batch[1]
