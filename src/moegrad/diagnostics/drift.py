"""Routing drift: how differently two models with the same MoE layers route the same tokens.

Shapes: T tokens, E experts, K top-k.

For each router layer (every :class:`moegrad.Router` in the model, including the
:class:`moegrad.hf.HFRouter` of a ``moegrad.hf``-patched model), with S_a(t), S_b(t) the top-k
sets and s_a(t), s_b(t) the [E] routing scores of token t under models a and b, over the T real
(non-padding) tokens of all batches:

    topk_overlap  = mean_t |S_a(t) ∩ S_b(t)| / max(|S_a(t)|, |S_b(t)|)    in [0, 1] (K below
                                                                          for token choice)
    js_divergence = mean_t JS(p_t, q_t),  p_t = s_a(t) / sum s_a(t),  q_t = s_b(t) / sum s_b(t)
    JS(p, q)      = 1/2 KL(p || m) + 1/2 KL(q || m),  m = (p + q) / 2,
    KL(p || m)    = sum_i p_i ln(p_i / m_i)  (natural log, 0 ln 0 = 0)    in [0, ln 2]
    load_a[i]     = #{t: i in S_a(t)} / sum_t |S_a(t)|  (share of routed pairs, T K of them
                                                      for token choice; load_b alike)
    revived       = {i : load_a[i] = 0 < load_b[i]},  killed = {i : load_b[i] = 0 < load_a[i]}

Softmax scores already sum to 1; sigmoid scores are renormalised to a distribution first.
Under ``routing="expert_choice"`` and ``"remoe"`` a token's set S(t) is its chosen experts
(``Routing.chosen``, 0..E of them; two empty sets overlap fully) and ReMoE's scores are its ReLU
gates (a token whose gates are all 0 counts as uniform in the JS divergence).
This is the "does fine-tuning change the routing?" measurement (e.g. DenseMixer, 2025, which
reports routing changes under fine-tuning with dense router gradients).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from moegrad.routing import is_router

__all__ = ["compare_routing", "topk_overlap", "js_divergence", "router_layers"]


def topk_overlap(indices_a: Tensor, indices_b: Tensor) -> Tensor:
    """indices_a, indices_b [T, K] int (each row K distinct experts) -> [T] float64
    |S_a ∩ S_b| / K per token (the order of the K picks does not matter)."""
    if indices_a.shape != indices_b.shape or indices_a.dim() != 2:
        raise ValueError(f"indices_a and indices_b must both be [T, K]; got {tuple(indices_a.shape)} "
                         f"and {tuple(indices_b.shape)}")
    same = indices_a[:, :, None] == indices_b[:, None, :]  # [T, K, K]
    return same.any(-1).sum(-1).double() / indices_a.shape[1]


def js_divergence(scores_a: Tensor, scores_b: Tensor) -> Tensor:
    """scores_a, scores_b [T, E] non-negative -> [T] float64 Jensen-Shannon divergence (natural
    log) of the rows renormalised to sum 1: 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2."""
    if scores_a.shape != scores_b.shape or scores_a.dim() != 2:
        raise ValueError(f"scores_a and scores_b must both be [T, E]; got {tuple(scores_a.shape)} "
                         f"and {tuple(scores_b.shape)}")
    p, q = _distribution(scores_a), _distribution(scores_b)
    m = (p + q) / 2
    kl_p = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_q = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return (0.5 * (kl_p + kl_q)).clamp_min(0.0)


def _distribution(scores: Tensor) -> Tensor:
    """[T, E] non-negative -> rows renormalised to sum 1 (an all-zero row -> uniform)."""
    s = scores.double()
    total = s.sum(-1, keepdim=True)
    return torch.where(total > 0, s / total.clamp_min(1e-300), torch.full_like(s, 1.0 / s.shape[-1]))


def _members(routing, num_experts: int) -> Tensor:
    """[T, E] bool: token t's experts (``Routing.chosen`` for the pair routings, else the
    [T, K] ``indices`` scattered)."""
    if routing.chosen is not None:
        return routing.chosen.detach().cpu()
    indices = routing.indices.detach().cpu()
    out = torch.zeros(indices.shape[0], num_experts, dtype=torch.bool)
    return out.scatter_(1, indices.long(), True)


def router_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: module} of every :class:`moegrad.Router` in ``model`` (HFRouter
    included), in module order; the model itself, if a Router, is named "router"."""
    return {(name or "router"): m for name, m in model.named_modules() if is_router(m)}


class _LayerDrift:
    """Running sums of one layer's drift metrics over batches."""

    def __init__(self, name: str, num_experts: int, top_k: int) -> None:
        self.name, self.num_experts, self.top_k = name, num_experts, top_k
        self.tokens, self.overlap, self.js = 0, 0.0, 0.0
        self.counts_a = torch.zeros(num_experts, dtype=torch.int64)
        self.counts_b = torch.zeros(num_experts, dtype=torch.int64)

    def update(self, ra, rb, keep: Optional[Tensor]) -> None:
        sa, sb = ra.scores.detach().cpu(), rb.scores.detach().cpu()
        if sa.shape != sb.shape:
            raise ValueError(
                f"layer {self.name!r} routed {sa.shape[0]} tokens in model_a but {sb.shape[0]} in "
                "model_b on the same batch; both models must see the same tokens")
        ma, mb = _members(ra, self.num_experts), _members(rb, self.num_experts)  # [T, E] bool
        if keep is not None:
            ma, mb, sa, sb = ma[keep], mb[keep], sa[keep], sb[keep]
        self.tokens += ma.shape[0]
        both, most = (ma & mb).sum(-1), torch.maximum(ma.sum(-1), mb.sum(-1))
        self.overlap += float(torch.where(most > 0, both / most.clamp_min(1), 1.0).double().sum())
        self.js += float(js_divergence(sa, sb).sum())
        self.counts_a += ma.sum(0)
        self.counts_b += mb.sum(0)

    def result(self) -> dict:
        if self.tokens == 0:
            raise ValueError(f"layer {self.name!r} saw no real (non-padding) tokens in batches")
        a, b = self.counts_a, self.counts_b
        return {"layer": self.name, "num_experts": self.num_experts, "top_k": self.top_k,
                "tokens": self.tokens, "topk_overlap": self.overlap / self.tokens,
                "js_divergence": self.js / self.tokens,
                "load_a": (a.double() / max(int(a.sum()), 1)).tolist(),
                "load_b": (b.double() / max(int(b.sum()), 1)).tolist(),
                "revived": [i for i in range(self.num_experts) if a[i] == 0 and b[i] > 0],
                "killed": [i for i in range(self.num_experts) if a[i] > 0 and b[i] == 0]}


def _call(model: nn.Module, item):
    if isinstance(item, Tensor):
        return model(item)
    if isinstance(item, tuple):
        return model(*item)
    if isinstance(item, dict):
        return model(**item)
    raise TypeError(f"each item of batches must be a Tensor (model(item)), a tuple (model(*item)) "
                    f"or a dict (model(**item)); got {type(item).__name__}")


def _attention_mask(item) -> Optional[Tensor]:
    """A dict item's ``attention_mask`` [B, S] (1 = real token), for HF models whose patched
    blocks route padding too (their Routing.mask is None)."""
    mask = item.get("attention_mask") if isinstance(item, dict) else None
    return mask if isinstance(mask, Tensor) else None


def _token_mask(routing, item) -> Optional[Tensor]:
    """[T] bool real tokens of one routing call (None: all real), on the CPU."""
    if routing.mask is not None:
        return routing.mask.detach().cpu()
    mask = _attention_mask(item)
    if mask is not None and tuple(mask.shape) == tuple(routing.shape):
        return mask.detach().cpu().reshape(-1).bool()
    return None


def compare_routing(model_a: nn.Module, model_b: nn.Module, batches: Iterable) -> list[dict]:
    """Per router layer, how model_b's routing differs from model_a's on the same batches.

    ``model_a``, ``model_b``: models holding the same router layers (same qualified names,
    numbers of experts E and top-k K): :class:`moegrad.MoE` / :class:`moegrad.Router` layers or
    ``moegrad.hf``-patched transformers models. ``batches``: an iterable of model inputs, each
    passed as ``model(item)`` (Tensor), ``model(*item)`` (tuple) or ``model(**item)`` (dict).
    Both models run every item in eval mode under ``torch.no_grad`` (their modules' training
    flags are restored afterwards); each router's returned :class:`moegrad.Routing` is captured
    by a forward hook. Padding tokens are left out: those outside ``Routing.mask`` when it is
    given, else, for a dict item, those with ``attention_mask`` 0 when its shape is the
    routing's leading shape [B, S] (a patched HF block routes padding too).

    Returns one dict per layer, in module order (see the module docstring for the maths):
    ``{"layer", "num_experts", "top_k", "tokens", "topk_overlap", "js_divergence", "load_a",
    "load_b", "revived", "killed"}``. Raises ValueError if the models' router layers differ,
    if ``batches`` is empty, or if a layer routes a different number of tokens or calls in the
    two models on the same batch; TypeError for an item that is not a Tensor, tuple or dict.
    """
    for arg, model in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{arg} must be a torch.nn.Module, got {type(model).__name__}")
    layers_a, layers_b = router_layers(model_a), router_layers(model_b)
    if not layers_a:
        raise ValueError(f"model_a ({type(model_a).__name__}) holds no moegrad.Router layer "
                         "(a moegrad.MoE / Router, or a model patched by moegrad.hf.patch)")
    layout_a, layout_b = ([(n, r.config.num_experts, r.config.top_k) for n, r in layers.items()]
                          for layers in (layers_a, layers_b))
    if layout_a != layout_b:
        raise ValueError(f"model_a and model_b must have the same router layers (name, E, K); "
                         f"got {layout_a} and {layout_b}")
    drift = {n: _LayerDrift(n, r.config.num_experts, r.config.top_k) for n, r in layers_a.items()}
    # one hook per router module (model_a may share modules with model_b, or be model_b):
    # it files the Routing under the side whose forward is running
    names = {side: {id(r): n for n, r in layers.items()}
             for side, layers in (("a", layers_a), ("b", layers_b))}
    running = {"side": "a"}
    captured: dict[str, list] = {}

    def hook(module, args, output):
        name = names[running["side"]].get(id(module))
        if name is not None:
            captured.setdefault(name, []).append(output)

    flags = {m: m.training for model in (model_a, model_b) for m in model.modules()}
    modules = {id(r): r for r in (*layers_a.values(), *layers_b.values())}
    handles = []
    batches_seen = 0
    try:
        handles = [r.register_forward_hook(hook) for r in modules.values()]
        model_a.eval()
        model_b.eval()
        with torch.no_grad():
            for item in batches:
                calls = {}
                for now, model in (("a", model_a), ("b", model_b)):
                    running["side"] = now
                    captured.clear()
                    _call(model, item)
                    calls[now] = dict(captured)
                for name, layer in drift.items():
                    calls_a, calls_b = calls["a"].get(name, []), calls["b"].get(name, [])
                    if len(calls_a) != len(calls_b):
                        raise ValueError(
                            f"layer {name!r} ran {len(calls_a)} times in model_a but "
                            f"{len(calls_b)} in model_b on batch {batches_seen}")
                    for ra, rb in zip(calls_a, calls_b):
                        ka, kb = _token_mask(ra, item), _token_mask(rb, item)
                        keep = ka if kb is None else kb if ka is None else ka & kb
                        layer.update(ra, rb, keep)
                batches_seen += 1
    finally:
        for h in handles:
            h.remove()
        for m, was in flags.items():
            m.training = was
    if batches_seen == 0:
        raise ValueError("batches is empty; give at least one model input")
    return [layer.result() for layer in drift.values()]
