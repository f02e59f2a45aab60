"""How good is an estimator's router gradient? Compare it with exact references.

Shapes: T tokens, D model dim, E experts, K top-k, R samples.

For an MoE layer, a batch x [T, D] and per-token losses ``loss_fn(y [T, D]) -> [T]`` (the task
objective is mean_t L_t), two reference gradients with respect to the router logits z [T, E]
are computed in float64 with the experts' outputs e [T, E, D] held fixed:

* ``exact``: dJ/dz of the expected loss of the sampled top-k policy
  (:func:`moegrad.diagnostics.expected.expected_loss`, every subset enumerated), with the
  forward weight rule of the estimator being measured (:func:`weight_rule`): score weights
  w_i = c * s_i for ``topk``, ``dense``, ``default_moe``, unit weights w_i = c for
  ``straight_through``, ``unweighted`` and ``gumbel`` with ``hard=True``, and so on. An
  estimator is compared with the gradient of the model its own forward computes;
* ``dense``: dJ/dz of the dense-mixture loss mean_t L_t(c * sum_i s_i e_i) (the same for every
  estimator).

Each estimator's gradient is taken from a real :class:`moegrad.MoE` built with that estimator
(:func:`clone_with_estimator`: same weights, buffers and options, no balance loss, training
mode). For a stochastic estimator the R sampled gradients g_r are summarised by their mean gbar
and the bias/variance decomposition, relative to the reference g*:

    mse = mean_r ||g_r - g*||^2 / ||g*||^2 = bias2 + variance,
    bias2 = ||gbar - g*||^2 / ||g*||^2,   variance = mean_r ||g_r - gbar||^2 / ||g*||^2.

Training uses one sample per step, so ``sample_cos_exact`` (the mean over r of cos(g_r, g*))
is the figure that says how well a sampling estimator's updates point; ``cos_exact`` (the
cosine of gbar) is what R samples achieve together. For a deterministic estimator they are
equal.

The cosine of a zero gradient with anything is reported as 0. A sampled gradient whose norm is
below ``ZERO_TOL`` times the exact gradient's norm is float32 rounding noise (e.g. the
derivative of s / (s + 1e-20) for top-1 with ``normalize=True`` is 1/s - s/s^2, zero in exact
arithmetic) and is counted as zero.

The exact enumeration models the router's ``score``, ``normalize``, ``temperature`` and
``routed_scaling_factor`` (and any ``activation`` or ``impl``); it cannot model group-limited
top-k, a selection bias or a capacity limit, and :func:`reference_gradients` refuses them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from moegrad import estimators as registry  # "estimators" names an argument below
from moegrad._checks import check_choice, check_float, check_int
from moegrad.diagnostics.expected import WEIGHT_RULES, dense_mixture_loss, expected_loss
from moegrad.experts import map_weights
from moegrad.layer import MoE

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


@dataclass(frozen=True)
class WeightRule:
    """The forward weight rule of an exact reference, y_S = sum_{i in S} w_i e_i:

    ``weights="score"``: w_i = scale * score(z)_i, renormalised over S if ``normalize``;
    ``weights="unit"``: w_i = scale (``score`` and ``normalize`` unused).
    """

    weights: str = "score"
    score: str = "softmax"
    normalize: bool = False
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_choice("weights", self.weights, WEIGHT_RULES)
        check_choice("score", self.score, ("sigmoid", "softmax"))
        check_float("scale", self.scale, low=0.0, low_open=True)

    @property
    def label(self) -> str:
        """A short description for reports, e.g. "softmax weights" or "unit weights"."""
        if self.weights == "unit":
            text = "unit weights"
        else:
            text = f"{self.score} weights" + (" renormalised over S" if self.normalize else "")
        return text if self.scale == 1.0 else f"{text} x {self.scale:g}"


def weight_rule(estimator) -> WeightRule:
    """The forward weight rule of an estimator instance (e.g. ``moe.router.estimator``): the
    model whose expected loss is the exact reference for it. c = routed_scaling_factor.

    ======================================  ==================================================
    ``topk``, ``dense``, ``default_moe``    the router's score weights c * s_S (/ sum_S s if
                                            ``normalize``); default_moe's
                                            ``forward_defaults=True`` extra term is not modelled
    ``straight_through``                    unit weights c
    ``unweighted``                          unit weights 1
    ``gumbel``, ``hard=True``               unit weights c
    ``gumbel``, ``hard=False``              softmax weights c * softmax(z)_S (/ sum_S if
                                            ``normalize``): the noise-free form of the sampled
                                            softmax((z + G) / tau), an approximation
    ``noisy_topk``                          c * softmax(z_S), i.e. softmax weights renormalised
                                            over S (its noise-free forward)
    ``sparsemixer``                         softmax weights c * softmax(z)_S, an approximation
                                            (its mask, Heun multiplier and the renormalisation of
                                            later picks are not modelled)
    ======================================  ==================================================

    With K = 1 renormalised weights are the constant c, so such a rule is returned as "unit".
    Estimators not listed get the router's score weights.
    """
    cfg = estimator.config
    c = cfg.routed_scaling_factor
    name = estimator.name
    if name == "unweighted":
        return WeightRule("unit", scale=1.0)
    if name == "straight_through" or (name == "gumbel" and estimator.hard):
        return WeightRule("unit", scale=c)
    if name == "noisy_topk":
        score, normalize = "softmax", True
    elif name == "sparsemixer":
        score, normalize = "softmax", False
    elif name == "gumbel":
        score, normalize = "softmax", cfg.normalize
    else:
        score, normalize = cfg.score, cfg.normalize
    if normalize and cfg.top_k == 1:
        return WeightRule("unit", scale=c)
    return WeightRule("score", score=score, normalize=normalize, scale=c)


@dataclass
class ReferenceGradients:
    """logits_exact, logits_dense [T, E]: dJ/dz of the expected and the dense-mixture loss;
    gate_exact [E, D]: the exact gradient for the gate weight (dJ/dz^T x / temperature);
    loss_exact: J(z) of the sampled policy; loss_dense: the dense-mixture loss; rule: the
    forward weight rule of the exact reference."""

    logits_exact: Tensor
    logits_dense: Tensor
    gate_exact: Tensor
    loss_exact: float
    loss_dense: float
    rule: Optional[WeightRule] = None


def check_enumerable(moe) -> None:
    """Raise ValueError if ``moe`` routes in a way the exact enumeration cannot model."""
    cfg = moe.router.config
    supported = ("supported: score, normalize, temperature, routed_scaling_factor, activation, "
                 "impl, top_k with C(E, K) small enough to enumerate")
    if cfg.grouped:
        raise ValueError(
            f"n_group={cfg.n_group}, topk_group={cfg.topk_group}: the exact reference samples "
            "top-k from softmax(z / tau) over all experts and cannot model group-limited top-k; "
            f"measure a copy built without n_group/topk_group ({supported})")
    if cfg.selection_bias:
        raise ValueError(
            "selection_bias=True: the exact reference samples top-k from softmax(z / tau) and "
            "cannot model a selection-only bias; measure a copy built with selection_bias=False "
            f"({supported})")
    if getattr(moe, "capacity_factor", None) is not None:
        raise ValueError(
            f"capacity_factor={moe.capacity_factor}: the exact reference evaluates each token's "
            "subsets independently and cannot model pairs dropped by a capacity limit; measure "
            f"a copy built with capacity_factor=None ({supported})")


def reference_gradients(moe, x: Tensor, loss_fn: Callable[[Tensor], Tensor], *, tau: float = 1.0,
                        rule: Optional[WeightRule] = None) -> ReferenceGradients:
    """Exact and dense-mixture router gradients of ``moe`` (a :class:`moegrad.MoE`) at x [T, D].

    Uses the router's temperature; the sampling policy is softmax(z / tau) over the tempered
    logits z = x W_g^T / temperature. ``rule`` is the forward weight rule of the exact
    reference (default: that of ``moe``'s own estimator, :func:`weight_rule`); the dense
    mixture uses the router's score and routed scaling factor. Raises ValueError for
    group-limited top-k, a selection bias or a capacity limit (:func:`check_enumerable`).
    """
    check_float("tau", tau, low=0.0, low_open=True)
    check_enumerable(moe)
    if rule is None:
        rule = weight_rule(moe.router.estimator)
    elif not isinstance(rule, WeightRule):
        raise TypeError(f"rule must be a WeightRule or None, got {type(rule).__name__}")
    cfg = moe.router.config
    flat = x.reshape(-1, cfg.dim).detach().double()
    weight = moe.router.gate.weight.detach().double().requires_grad_(True)
    with torch.no_grad():
        weights = map_weights(lambda w: w.detach().double(), moe.experts.stacked_weights())
        every = moe.experts.every_expert(flat, weights)
    loss64 = lambda y: loss_fn(y).double()  # noqa: E731
    logits = flat @ weight.T
    z = logits / cfg.temperature
    z.retain_grad()
    j = expected_loss(z, every, loss64, cfg.top_k, tau=tau, score=rule.score,
                      normalize=rule.normalize, scale=rule.scale, weights=rule.weights)
    g_z, g_w = torch.autograd.grad(j, (z, weight))
    zd = (flat @ weight.detach().T / cfg.temperature).requires_grad_(True)
    jd = dense_mixture_loss(zd, every, loss64, score=cfg.score, scale=cfg.routed_scaling_factor)
    (g_zd,) = torch.autograd.grad(jd, (zd,))
    # report gradients with respect to the un-tempered logits, as Routing.logits holds them
    return ReferenceGradients(g_z / cfg.temperature, g_zd / cfg.temperature, g_w,
                              j.item(), jd.item(), rule)


#: state_dict keys that belong to the estimator (carried over only to the same estimator)
_ESTIMATOR_PREFIX = "router.estimator."


def clone_with_estimator(moe, estimator: str, **options):
    """A fresh :class:`moegrad.MoE` that routes like ``moe`` but with another estimator.

    Carried over: the shape, every router and layer option (routing, score, normalize, temperature,
    routed_scaling_factor, n_group/topk_group, selection_bias, check_finite, activation, impl,
    capacity_factor), every parameter and buffer (gate and expert weights, the selection bias
    values, load counts) as copies in their own dtype and device, and the training mode. Balance
    losses are dropped. When ``estimator`` is ``moe``'s own, its options (except ``generator``)
    and its buffers (e.g. default_moe's EMA outputs) are kept too; ``options`` override them.
    """
    cfg = moe.router.config
    if cfg.routing == "remoe":
        raise ValueError("moe has routing='remoe', which takes no estimator (its ReLU gates are "
                         "differentiable): there is no other estimator to compare it with")
    source = moe.router.estimator
    same = source.name == estimator
    if same:
        options = {**{k: getattr(source, k) for k in source.options if k != "generator"}, **options}
    twin = MoE(cfg.dim, moe.experts.hidden_dim, cfg.num_experts, cfg.top_k, estimator=estimator,
               routing=cfg.routing, score=cfg.score, normalize=cfg.normalize, activation=moe.experts.activation,
               impl=moe.experts.impl, losses={}, capacity_factor=moe.capacity_factor,
               temperature=cfg.temperature, routed_scaling_factor=cfg.routed_scaling_factor,
               n_group=cfg.n_group, topk_group=cfg.topk_group, selection_bias=cfg.selection_bias,
               check_finite=cfg.check_finite, **options)
    twin.to(moe.router.gate.weight.device)
    theirs, mine = moe.state_dict(), twin.state_dict()
    layer_keys = lambda d: {k for k in d if not k.startswith(_ESTIMATOR_PREFIX)}  # noqa: E731
    if layer_keys(theirs) != layer_keys(mine):
        raise ValueError(
            f"clone_with_estimator cannot copy {type(moe).__name__}: its parameters/buffers "
            f"{sorted(layer_keys(theirs) ^ layer_keys(mine))} do not match a moegrad.MoE's")
    state = {k: v.detach().clone() for k, v in theirs.items()
             if k in mine and (same or not k.startswith(_ESTIMATOR_PREFIX))}
    twin.load_state_dict(state, strict=False, assign=True)
    return twin.train(moe.training)


def _twin(moe, estimator: str, seed: int, options: dict):
    """clone_with_estimator in training mode, a sampling estimator seeded by ``seed``."""
    cls = registry.get(estimator)
    if cls.samples and "generator" in cls.options and "generator" not in options:
        options = dict(options, generator=torch.Generator().manual_seed(seed))
    return clone_with_estimator(moe, estimator, **options).train()


def _sample_gradients(twin, x: Tensor, loss_fn: Callable[[Tensor], Tensor], samples: int
                      ) -> tuple[Tensor, Tensor]:
    """Router gradients of ``twin``: [R, T, E] for the logits, [R, E, D] for the gate weight
    (R = samples for a sampling estimator, else 1)."""
    repeats = samples if twin.router.estimator.samples else 1
    g_logits, g_gate = [], []
    for _ in range(repeats):
        out = twin(x.detach())
        loss = loss_fn(out.y).mean()
        gz, gw = torch.autograd.grad(loss, (out.routing.logits, twin.router.gate.weight),
                                     allow_unused=True)
        g_logits.append(torch.zeros_like(out.routing.logits) if gz is None else gz.detach())
        g_gate.append(torch.zeros_like(twin.router.gate.weight) if gw is None else gw.detach())
    return torch.stack(g_logits), torch.stack(g_gate)


def estimator_gradients(moe, x: Tensor, loss_fn: Callable[[Tensor], Tensor], estimator: str, *,
                        samples: int = 1, seed: int = 0, **options) -> tuple[Tensor, Tensor]:
    """Router gradients of ``estimator`` on a copy of ``moe``: ([R, T, E] for the logits,
    [R, E, D] for the gate weight). Deterministic estimators are evaluated once (R = 1);
    stochastic ones ``samples`` times with a generator seeded by ``seed``."""
    check_int("samples", samples, 1)
    return _sample_gradients(_twin(moe, estimator, seed, options), x, loss_fn, samples)


@dataclass
class Fidelity:
    """One estimator's router gradient against the references (see the module docstring).

    cos_exact / rel_err_exact: cosine and relative error of the mean gradient gbar [T, E] to
    the exact expected-loss gradient; cos_dense / rel_err_dense: the same against the
    dense-mixture gradient; cos_exact_gate: cosine of the gate-weight gradients [E, D];
    bias2, variance, mse: the decomposition relative to the exact gradient (variance 0 for a
    deterministic estimator); sample_cos_exact: mean cosine of single samples to the exact
    gradient (what one training step sees); samples: R; zero: whether the estimator's
    gradient is identically zero; reference: the forward weight rule of the exact reference
    (:attr:`WeightRule.label`).
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
    reference: str = ""

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
        samples=g.shape[0], zero=bool((g == 0).all()),
        reference=ref.rule.label if ref.rule is not None else "")


def gradient_fidelity(moe, x: Tensor, loss_fn: Callable[[Tensor], Tensor],
                      estimators: Optional[Iterable[str]] = None, *, samples: int = 16,
                      tau: float = 1.0, seed: int = 0, options: Optional[dict] = None
                      ) -> dict[str, Fidelity]:
    """For each estimator name (default: all), its :class:`Fidelity` on ``moe`` at x [T, D].

    ``loss_fn(y [T, D]) -> [T]`` per-token losses; ``samples`` draws for stochastic estimators;
    ``tau`` the temperature of the sampling policy of the exact reference; ``options`` maps an
    estimator name to its keyword options. Each estimator is compared with the exact gradient
    under its own forward weight rule (:func:`weight_rule`, named in ``Fidelity.reference``).
    ``moe`` itself is not modified. Raises ValueError where the exact enumeration cannot model
    ``moe``'s routing (:func:`check_enumerable`).
    """
    names = registry.available() if estimators is None else list(estimators)
    for name in names:
        registry.get(name)
    check_int("samples", samples, 1)
    check_enumerable(moe)
    options = options or {}
    refs: dict[WeightRule, ReferenceGradients] = {}
    out = {}
    for name in names:
        twin = _twin(moe, name, seed, options.get(name, {}))
        rule = weight_rule(twin.router.estimator)
        if rule not in refs:
            refs[rule] = reference_gradients(moe, x, loss_fn, tau=tau, rule=rule)
        grads, gate = _sample_gradients(twin, x, loss_fn, samples)
        out[name] = fidelity(grads, gate, refs[rule], name)
    return out
