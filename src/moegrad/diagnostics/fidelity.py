"""How good is an estimator's router gradient? Compare it with exact references.

Shapes: T tokens, D model dim, E experts, K top-k, R samples.

For an MoE layer, a batch x [T, D] and per-token losses ``loss_fn(y [T, D]) -> [T]`` (the task
objective is mean_t L_t), two reference gradients with respect to the router logits z [T, E]
are computed in float64 with the experts' outputs e [T, E, D] held fixed:

* ``exact``: dJ/dz of the expected loss of the sampled top-k policy
  (:func:`moegrad.diagnostics.expected.expected_loss`, every subset enumerated);
* ``dense``: dJ/dz of the dense-mixture loss mean_t L_t(c * sum_i s_i e_i).

Each estimator's gradient is taken from a real :class:`moegrad.MoE` built with that estimator
(same weights, no balance loss, training mode). For a stochastic estimator the R sampled
gradients g_r are summarised by their mean gbar and the bias/variance decomposition, relative
to the reference g*:

    mse = mean_r ||g_r - g*||^2 / ||g*||^2 = bias2 + variance,
    bias2 = ||gbar - g*||^2 / ||g*||^2,   variance = mean_r ||g_r - gbar||^2 / ||g*||^2.

The cosine of a zero gradient with anything is reported as 0. A sampled gradient whose norm is
below ``ZERO_TOL`` times the exact gradient's norm is float32 rounding noise (e.g. the
derivative of s / (s + 1e-20) for top-1 with ``normalize=True`` is 1/s - s/s^2, zero in exact
arithmetic) and is counted as zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from moegrad._checks import check_float, check_int
from moegrad.diagnostics.expected import dense_mixture_loss, expected_loss

#: gradients smaller than this fraction of the exact gradient's norm count as zero
ZERO_TOL = 1e-6


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two flattened tensors in float64; 0 if either is zero."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = a.norm(), b.norm()
    if float(na) == 0.0 or float(nb) == 0.0:
        return 0.0
    return float(a @ b / (na * nb))


def relative_error(a: Tensor, ref: Tensor) -> float:
    """||a - ref|| / ||ref|| in float64 (inf if ref is zero and a is not, 0 if both are)."""
    a, ref = a.reshape(-1).double(), ref.reshape(-1).double()
    num, den = float((a - ref).norm()), float(ref.norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


@dataclass
class ReferenceGradients:
    """logits_exact, logits_dense [T, E]: dJ/dz of the expected and the dense-mixture loss;
    gate_exact [E, D]: the exact gradient for the gate weight (dJ/dz^T x / temperature);
    loss_exact: J(z) of the sampled policy; loss_dense: the dense-mixture loss."""

    logits_exact: Tensor
    logits_dense: Tensor
    gate_exact: Tensor
    loss_exact: float
    loss_dense: float


def reference_gradients(moe, x: Tensor, loss_fn: Callable[[Tensor], Tensor], *, tau: float = 1.0
                        ) -> ReferenceGradients:
    """Exact and dense-mixture router gradients of ``moe`` (a :class:`moegrad.MoE`) at x [T, D].

    Uses the router's score, normalize, temperature and routed scaling factor; the sampling
    policy is softmax(z / tau) over the tempered logits z = x W_g^T / temperature.
    """
    check_float("tau", tau, low=0.0, low_open=True)
    cfg = moe.router.config
    flat = x.reshape(-1, cfg.dim).detach().double()
    weight = moe.router.gate.weight.detach().double().requires_grad_(True)
    with torch.no_grad():
        every = moe.experts.every_expert(flat, *(w.detach().double() for w in moe.experts.stacked_weights()))
    loss64 = lambda y: loss_fn(y).double()  # noqa: E731
    logits = flat @ weight.T
    z = logits / cfg.temperature
    z.retain_grad()
    j = expected_loss(z, every, loss64, cfg.top_k, tau=tau, score=cfg.score,
                      normalize=cfg.normalize, scale=cfg.routed_scaling_factor)
    g_z, g_w = torch.autograd.grad(j, (z, weight))
    zd = (flat @ weight.detach().T / cfg.temperature).requires_grad_(True)
    jd = dense_mixture_loss(zd, every, loss64, score=cfg.score, scale=cfg.routed_scaling_factor)
    (g_zd,) = torch.autograd.grad(jd, (zd,))
    # report gradients with respect to the un-tempered logits, as Routing.logits holds them
    return ReferenceGradients(g_z / cfg.temperature, g_zd / cfg.temperature, g_w,
                              j.item(), jd.item())


def clone_with_estimator(moe, estimator: str, **options):
    """A fresh :class:`moegrad.MoE` with ``moe``'s shape, routing rules and weights, no balance
    losses, and the given estimator (its options in ``options``)."""
    from moegrad.layer import MoE

    cfg = moe.router.config
    twin = MoE(cfg.dim, moe.experts.hidden_dim, cfg.num_experts, cfg.top_k, estimator=estimator,
               score=cfg.score, normalize=cfg.normalize, activation=moe.experts.activation,
               losses={}, temperature=cfg.temperature,
               routed_scaling_factor=cfg.routed_scaling_factor, **options)
    source = {k: v for k, v in moe.state_dict().items() if k in twin.state_dict()}
    twin.load_state_dict(source, strict=False)
    return twin.to(moe.router.gate.weight.device)


def estimator_gradients(moe, x: Tensor, loss_fn: Callable[[Tensor], Tensor], estimator: str, *,
                        samples: int = 1, seed: int = 0, **options) -> tuple[Tensor, Tensor]:
    """Router gradients of ``estimator`` on a copy of ``moe``: ([R, T, E] for the logits,
    [R, E, D] for the gate weight). Deterministic estimators are evaluated once (R = 1);
    stochastic ones ``samples`` times with a generator seeded by ``seed``."""
    from moegrad import estimators

    check_int("samples", samples, 1)
    cls = estimators.get(estimator)
    if cls.samples and "generator" in cls.options and "generator" not in options:
        options = dict(options, generator=torch.Generator().manual_seed(seed))
    twin = clone_with_estimator(moe, estimator, **options).train()
    repeats = samples if cls.samples else 1
    g_logits, g_gate = [], []
    for _ in range(repeats):
        out = twin(x.detach())
        loss = loss_fn(out.y).mean()
        gz, gw = torch.autograd.grad(loss, (out.routing.logits, twin.router.gate.weight),
                                     allow_unused=True)
        g_logits.append(torch.zeros_like(out.routing.logits) if gz is None else gz.detach())
        g_gate.append(torch.zeros_like(twin.router.gate.weight) if gw is None else gw.detach())
    return torch.stack(g_logits), torch.stack(g_gate)


@dataclass
class Fidelity:
    """One estimator's router gradient against the references (see the module docstring).

    cos_exact / rel_err_exact: cosine and relative error of the mean gradient gbar [T, E] to
    the exact expected-loss gradient; cos_dense / rel_err_dense: the same against the
    dense-mixture gradient; cos_exact_gate: cosine of the gate-weight gradients [E, D];
    bias2, variance, mse: the decomposition relative to the exact gradient (variance 0 for a
    deterministic estimator); sample_cos_exact: mean cosine of single samples to the exact
    gradient; samples: R; zero: whether the estimator's gradient is identically zero.
    """

    estimator: str
    cos_exact: float
    rel_err_exact: float
    cos_dense: float
    rel_err_dense: float
    cos_exact_gate: float
    bias2: float
    variance: float
    mse: float
    sample_cos_exact: float
    samples: int
    zero: bool

    def as_dict(self) -> dict:
        return asdict(self)


def fidelity(grads: Tensor, gate_grads: Tensor, ref: ReferenceGradients, name: str) -> Fidelity:
    """grads [R, T, E], gate_grads [R, E, D] sampled estimator gradients -> :class:`Fidelity`."""
    exact = ref.logits_exact.double()
    g = grads.double()
    noise = g.flatten(1).norm(dim=1) <= ZERO_TOL * exact.norm()  # [R] rounding-noise samples
    g = torch.where(noise[:, None, None], torch.zeros_like(g), g)
    gate_grads = torch.where(noise[:, None, None], torch.zeros_like(gate_grads), gate_grads)
    mean = g.mean(0)
    norm2 = float(exact.pow(2).sum()) or float("inf")
    bias2 = float((mean - exact).pow(2).sum()) / norm2
    variance = float((g - mean).pow(2).sum((1, 2)).mean()) / norm2
    return Fidelity(
        estimator=name,
        cos_exact=cosine(mean, exact), rel_err_exact=relative_error(mean, exact),
        cos_dense=cosine(mean, ref.logits_dense), rel_err_dense=relative_error(mean, ref.logits_dense),
        cos_exact_gate=cosine(gate_grads.double().mean(0), ref.gate_exact),
        bias2=bias2, variance=variance, mse=bias2 + variance,
        sample_cos_exact=sum(cosine(s, exact) for s in g) / g.shape[0],
        samples=g.shape[0], zero=bool((g == 0).all()))


def gradient_fidelity(moe, x: Tensor, loss_fn: Callable[[Tensor], Tensor],
                      estimators: Optional[Iterable[str]] = None, *, samples: int = 16,
                      tau: float = 1.0, seed: int = 0, options: Optional[dict] = None
                      ) -> dict[str, Fidelity]:
    """For each estimator name (default: all), its :class:`Fidelity` on ``moe`` at x [T, D].

    ``loss_fn(y [T, D]) -> [T]`` per-token losses; ``samples`` draws for stochastic estimators;
    ``tau`` the temperature of the sampling policy of the exact reference; ``options`` maps an
    estimator name to its keyword options. ``moe`` itself is not modified.
    """
    from moegrad import estimators as registry

    names = registry.available() if estimators is None else list(estimators)
    for name in names:
        registry.get(name)
    options = options or {}
    ref = reference_gradients(moe, x, loss_fn, tau=tau)
    out = {}
    for name in names:
        grads, gate = estimator_gradients(moe, x, loss_fn, name, samples=samples, seed=seed,
                                          **options.get(name, {}))
        out[name] = fidelity(grads, gate, ref, name)
    return out
