"""The framework-free specification that :mod:`moegrad` (PyTorch) and :mod:`moegrad.mlx` share.

Everything here is plain Python (no torch, no mlx, no numpy), so both frameworks validate and
name things the same way, from one place:

* :class:`RouterConfig`: the router settings and their checks; :data:`ROUTINGS` the routing
  methods (``routing=``), :func:`resolve_estimator` / :func:`default_losses` /
  :func:`router_capacity_factor` what each routing takes, :data:`SINKHORN_TOL` /
  :data:`SINKHORN_MAX_ITERS` / :data:`SINKHORN_EPS` the Sinkhorn selection's constants and
  :data:`REMOE_L1_INIT` / :data:`REMOE_L1_ALPHA` ReMoE's;
  :class:`RouterViews` / :class:`LayerViews`: the read-only views both frameworks' routers and
  layers give of them (``num_experts``, ``top_k``, ...) and their repr text;
* :data:`ESTIMATORS`: the estimator names, their options with defaults and checks, and which
  estimators sample or observe expert outputs (:func:`estimator_options` validates a call);
  :class:`EstimatorOptions`: the option handling both frameworks' ``Estimator`` base classes
  inherit; :func:`make_registry`: a framework's estimator classes -> ``REGISTRY``,
  ``available``, ``get``, ``build_estimator``;
* :data:`LOSS_NAMES`, :func:`bind_losses` and :func:`check_losses`: the balance-loss names,
  each framework's functions bound to them by name, and the ``losses=`` checks;
  :func:`balanced_routers`: a ``BiasBalancer``'s argument checks; :func:`quantile_balanced_routers`,
  :func:`quantile_range`, :func:`quantile_rank`, :func:`histogram_quantile`: a
  ``QuantileBalancer``'s argument checks, histogram range and quantile rule;
* :func:`expert_capacity` and :func:`dense_chunk_tokens`: two sizing rules;
* :func:`warn_if_no_task_gradient`: the top-1 renormalised trap, said at construction;
* the messages for non-finite router logits.

Each framework keeps only what needs its tensors: its estimator classes and its random-number
option (``generator`` for PyTorch, ``seed`` for MLX) with that option's check.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple, Optional

from moegrad._checks import check_bool, check_choice, check_float, check_int

SCORES = ("sigmoid", "softmax")

#: the routing methods (``routing=``): "topk" token-choice top-k of the (biased) scores;
#: "sinkhorn" (Megatron-Core's ``moe_router_load_balancing_type="sinkhorn"``) selects in
#: training mode the top-k of the Sinkhorn-balanced scores and weighs with the scores
#: themselves (:func:`moegrad.selection.sinkhorn`); "expert_choice" (Zhou et al. 2022): each
#: expert takes its top-c tokens by score (:meth:`moegrad.selection.Selection.select_expert_choice`);
#: "remoe" (Wang et al., ICLR 2025): ReLU gates, a token's experts are those with a positive
#: gate, steered to K on average by an adaptive L1 penalty (:mod:`moegrad.routing`)
ROUTINGS = ("expert_choice", "remoe", "sinkhorn", "topk")
#: the token-choice routings (a token's experts are its top-k of some matrix): what consumers
#: that read ``Routing.indices`` as "token t's K experts" (moegrad study) take
TOKEN_CHOICE_ROUTINGS = ("sinkhorn", "topk")
#: the routings whose ``Routing`` says per (token, expert) pair which pairs are routed
#: (``Routing.chosen`` [T, E], indices every expert): a token gets 0..E experts
PAIR_ROUTINGS = ("expert_choice", "remoe")
#: the estimators expert-choice routing takes: its weights are the gathered scores with plain
#: autograd; the other estimators' maths is about a token's choice of K experts
EXPERT_CHOICE_ESTIMATORS = ("topk",)
#: the balance losses each routing outside the token-choice ones takes: expert choice is
#: balanced by construction (every expert gets exactly c tokens), ReMoE balances with its own
#: load-weighted L1 penalty; the logit-size z_loss means something for both
ROUTING_LOSSES = {"expert_choice": ("z_loss",), "remoe": ("z_loss",)}
#: the balance losses expert-choice routing takes (:data:`ROUTING_LOSSES`)
EXPERT_CHOICE_LOSSES = ROUTING_LOSSES["expert_choice"]
#: ReMoE's adaptive L1 coefficient: starting value lambda_0 and growth factor alpha
#: (the paper's 1e-8 and 1.2)
REMOE_L1_INIT = 1e-8
REMOE_L1_ALPHA = 1.2
#: Sinkhorn stops when the mean absolute change of the column scaling is <= SINKHORN_TOL
#: (Megatron-Core's tol=1e-4) or after SINKHORN_MAX_ITERS iterations (Megatron has no cap);
#: SINKHORN_EPS keeps the divisions finite (Megatron's 1e-8)
SINKHORN_TOL = 1e-4
SINKHORN_MAX_ITERS = 1000
SINKHORN_EPS = 1e-8


def check_routing(routing) -> str:
    """``routing`` -> itself if known; ValueError naming the allowed values otherwise."""
    if not isinstance(routing, str) or routing not in ROUTINGS:
        raise ValueError(f"routing={routing!r} is unknown; choose one of {list(ROUTINGS)}")
    return routing


def resolve_estimator(estimator, routing: str) -> str:
    """The estimator a router with ``routing`` builds: ``estimator`` (None: "topk", plain
    autograd through the selected weights). ``routing="remoe"`` takes no estimator (its ReLU
    gates are differentiable, nothing to estimate): a name given there is a ValueError."""
    if routing == "remoe":
        if estimator is not None:
            raise ValueError(
                f"routing='remoe' with estimator={estimator!r}: ReMoE's ReLU gates are "
                "differentiable, so there is no top-k gradient to estimate; leave estimator unset "
                "(None). The estimators apply to routing='topk' (and 'sinkhorn', 'expert_choice' "
                "where allowed)")
        return "topk"
    return "topk" if estimator is None else estimator


def default_losses(routing: str) -> dict:
    """A layer's balance losses when ``losses=None``: {"switch": 1e-2} for token choice, none
    for the routings of :data:`ROUTING_LOSSES`."""
    return {} if routing in ROUTING_LOSSES else {"switch": 1e-2}


def router_capacity_factor(routing: str, capacity_factor):
    """The layer's ``capacity_factor`` -> the router's: expert choice's f (the layer passes it
    on), None for the other routings; ``routing="remoe"`` is dropless (ValueError otherwise)."""
    if routing == "remoe" and capacity_factor is not None:
        raise ValueError(f"routing='remoe' with capacity_factor={capacity_factor!r}: ReMoE is "
                         "dropless (a token's experts are its positive gates, the adaptive L1 "
                         "penalty keeps their number near top_k); leave capacity_factor=None")
    return capacity_factor if routing == "expert_choice" else None


@dataclass
class RouterConfig:
    """Validated router settings (see :class:`moegrad.Router` for their meaning)."""

    dim: int
    num_experts: int
    top_k: int
    score: Optional[str] = None
    normalize: bool = False
    temperature: float = 1.0
    routed_scaling_factor: float = 1.0
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    selection_bias: bool = False
    check_finite: bool = True
    routing: str = "topk"
    capacity_factor: Optional[float] = None
    l1_init: Optional[float] = None
    l1_alpha: Optional[float] = None

    def __post_init__(self) -> None:
        check_int("dim", self.dim, 1)
        check_routing(self.routing)
        self._resolve_remoe()
        if self.capacity_factor is not None:
            if self.routing != "expert_choice":
                raise ValueError(
                    f"RouterConfig capacity_factor={self.capacity_factor!r} applies to "
                    f"routing='expert_choice' only (got routing={self.routing!r}); token-choice "
                    "capacity is the layer's capacity_factor")
            check_float("capacity_factor", self.capacity_factor, low=0.0, low_open=True)
        for name in ("normalize", "selection_bias", "check_finite"):
            setattr(self, name, check_bool(name, getattr(self, name)))
        check_int("num_experts", self.num_experts, 1)
        check_int("top_k", self.top_k, 1, self.num_experts)
        if self.routing != "remoe":
            check_choice("score", self.score, SCORES)
        check_float("temperature", self.temperature, low=0.0, low_open=True)
        check_float("routed_scaling_factor", self.routed_scaling_factor, low=0.0, low_open=True)
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError(
                f"n_group={self.n_group!r} and topk_group={self.topk_group!r}: group-limited "
                "top-k needs both (or neither)")
        if self.n_group is not None:
            check_int("n_group", self.n_group, 1, self.num_experts)
            if self.num_experts % self.n_group:
                raise ValueError(f"n_group={self.n_group} must divide num_experts={self.num_experts}")
            check_int("topk_group", self.topk_group, 1, self.n_group)
            reachable = self.topk_group * (self.num_experts // self.n_group)
            if self.top_k > reachable:
                raise ValueError(
                    f"top_k={self.top_k} is more than the {reachable} experts in topk_group="
                    f"{self.topk_group} groups of {self.num_experts // self.n_group}")
        if self.routing == "sinkhorn" and self.selection_bias:
            raise ValueError(
                "routing='sinkhorn' with selection_bias=True: Sinkhorn's column scaling already "
                "is a per-expert balancing correction, recomputed for every batch, so a learned "
                "selection bias (BiasBalancer) has nothing left to do and the two would fight; "
                "use routing='sinkhorn' with selection_bias=False, or routing='topk' with the bias")
        if self.routing == "expert_choice":
            for name, bad, why in (
                    ("selection_bias", self.selection_bias, "expert choice is balanced by "
                     "construction (every expert takes exactly c tokens), a selection bias has "
                     "nothing to correct"),
                    ("n_group", self.n_group is not None, "group-limited top-k restricts a "
                     "token's choice of experts, and under expert choice the experts choose"),
                    ("normalize", self.normalize, "the paper's gating weights are the scores "
                     "themselves; a token may have zero or several experts, so there is no "
                     "fixed set to renormalise over")):
                if bad:
                    value = getattr(self, name)
                    raise ValueError(f"routing='expert_choice' with {name}={value!r}: {why}; "
                                     f"leave {name} at its default")

    def _resolve_remoe(self) -> None:
        """score None -> "relu" for ReMoE, "softmax" otherwise; the L1 settings (ReMoE only)
        -> their defaults; the settings ReMoE has no use for -> ValueError."""
        remoe = self.routing == "remoe"
        for name, default in (("l1_init", REMOE_L1_INIT), ("l1_alpha", REMOE_L1_ALPHA)):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, default if remoe else None)
            elif not remoe:
                raise ValueError(f"RouterConfig {name}={value!r} applies to routing='remoe' only "
                                 f"(got routing={self.routing!r}); leave it None")
        if remoe:
            check_float("l1_init", self.l1_init, low=0.0, low_open=True)
            check_float("l1_alpha", self.l1_alpha, low=1.0, low_open=True)
        else:
            self.score = "softmax" if self.score is None else self.score
            return
        if self.score not in (None, "relu"):
            raise ValueError(f"routing='remoe' with score={self.score!r}: ReMoE's gates are "
                             "ReLU(logits / temperature); leave score unset (or 'relu')")
        self.score = "relu"
        for name, bad in (("normalize", self.normalize is True),
                          ("selection_bias", self.selection_bias is True),
                          ("n_group", self.n_group is not None),
                          ("capacity_factor", self.capacity_factor is not None)):
            if bad:
                raise ValueError(
                    f"routing='remoe' with {name}={getattr(self, name)!r}: a token's experts are "
                    "its positive ReLU gates and their weights are the gates themselves, steered "
                    "to top_k experts on average by the adaptive L1 penalty, so there is no "
                    f"top-k selection for {name} to act on; leave {name} at its default")

    @property
    def grouped(self) -> bool:
        return self.n_group is not None


class RouterViews:
    """Read-only views of a router's ``config`` (:class:`RouterConfig`) and its repr text, for
    both frameworks' ``Router`` (which hold ``config`` and ``estimator``)."""

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def top_k(self) -> int:
        return self.config.top_k

    def config_repr(self) -> str:
        c = self.config
        routing = "" if c.routing == "topk" else f", routing={c.routing}"
        if c.capacity_factor is not None:
            routing += f", capacity_factor={c.capacity_factor}"
        estimator = f", estimator={self.estimator.name}"
        if c.routing == "remoe":  # no estimator: the ReLU gates take plain autograd
            estimator = f", l1_init={c.l1_init:g}, l1_alpha={c.l1_alpha}"
        return (f"dim={c.dim}, num_experts={c.num_experts}, top_k={c.top_k}, score={c.score}, "
                f"normalize={c.normalize}{routing}{estimator}")


class LayerViews:
    """Read-only views of an MoE layer's ``router`` (``dim``, ``num_experts``, ``top_k``,
    ``estimator``) and its repr text, for both frameworks' ``MoE`` (which hold ``router``,
    ``losses`` and ``capacity_factor``)."""

    @property
    def dim(self) -> int:
        return self.router.config.dim

    @property
    def num_experts(self) -> int:
        return self.router.config.num_experts

    @property
    def top_k(self) -> int:
        return self.router.config.top_k

    @property
    def estimator(self):
        return self.router.estimator

    def config_repr(self) -> str:
        return f"losses={self.losses}, capacity_factor={self.capacity_factor}"


# ----------------------------------------------------------------------------- non-finite logits
def nonfinite_logits_message(bad: int, total: int) -> str:
    return (f"router logits are not finite for {bad} of {total} tokens: the input (or the gate "
            "weight) holds NaN/Inf. Fix the input, or pass check_finite=False to skip this check")


def nonfinite_tempered_message(temperature: float, bad: int, total: int) -> str:
    return (f"temperature={temperature!r} makes the finite router logits of {bad} of {total} "
            "tokens non-finite (logits / temperature overflows); use a larger temperature, or "
            "pass check_finite=False to skip this check")


# ----------------------------------------------------------------------------- estimators
def _optional_chunk(name: str, value):
    if value is not None:
        check_int(name, value, 1)
    return value


def _positive(name: str, value):
    check_float(name, value, low=0.0, low_open=True)
    return value


def _non_negative(name: str, value):
    check_float(name, value, low=0.0)
    return value


def _unit_interval(name: str, value):
    check_float(name, value, low=0.0, high=1.0, high_open=True)
    return value


@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator's name, its options ({name: (default, check(name, value) -> value)}),
    whether it draws random numbers in training (``samples``: it then also takes the
    framework's random-number option) and whether it wants per-expert output sums
    (``observes_outputs``)."""

    name: str
    options: dict
    samples: bool = False
    observes_outputs: bool = False

    def defaults(self) -> dict:
        return {key: default for key, (default, _) in self.options.items()}


ESTIMATORS: dict[str, EstimatorSpec] = {spec.name: spec for spec in (
    EstimatorSpec("topk", {}),
    EstimatorSpec("unweighted", {}),
    EstimatorSpec("straight_through", {}),
    EstimatorSpec("dense", {"chunk_tokens": (None, _optional_chunk)}),
    EstimatorSpec("default_moe", {"beta": (0.9, _unit_interval),
                                  "forward_defaults": (False, check_bool)},
                  observes_outputs=True),
    EstimatorSpec("gumbel", {"tau": (1.0, _positive), "hard": (False, check_bool)}, samples=True),
    EstimatorSpec("noisy_topk", {"noise_epsilon": (1e-2, _non_negative)}, samples=True),
    EstimatorSpec("sparsemixer", {"jitter_eps": (0.01, _non_negative)}, samples=True),
)}

#: estimators that never draw random numbers (the ones group-limited top-k and a selection bias allow)
DETERMINISTIC = tuple(sorted(name for name, spec in ESTIMATORS.items() if not spec.samples))


def estimator_names() -> list[str]:
    """Sorted names of every estimator."""
    return sorted(ESTIMATORS)


def estimator_spec(name) -> EstimatorSpec:
    """The spec of ``name``; ValueError listing the names for an unknown one."""
    if not isinstance(name, str) or name not in ESTIMATORS:
        raise ValueError(f"estimator={name!r} is unknown; choose one of {estimator_names()}")
    return ESTIMATORS[name]


def as_given(name: str, value):
    """The check of an option a user's own estimator declares: none."""
    return value


def custom_spec(name: str, options: dict, rng_option: str, samples: bool,
                observes_outputs: bool) -> EstimatorSpec:
    """The spec of a user's own estimator class (a name outside :data:`ESTIMATORS`): its
    declared ``options`` {name: default} taken as given."""
    return EstimatorSpec(name, {k: (v, as_given) for k, v in options.items() if k != rng_option},
                         samples, observes_outputs)


def attach_spec(cls, rng_option: str) -> None:
    """Give an estimator class (either framework) its spec and the class attributes read from
    it: ``spec``, ``options`` {name: default} (plus ``rng_option`` when it samples),
    ``samples``, ``observes_outputs``. A built-in ``cls.name`` takes :data:`ESTIMATORS`; a new
    name (a user's own estimator) keeps the options and flags its class declares."""
    if cls.name in ESTIMATORS:
        cls.spec = ESTIMATORS[cls.name]
    else:
        cls.spec = custom_spec(cls.name, cls.options, rng_option, cls.samples, cls.observes_outputs)
    cls.options = {**cls.spec.defaults(), **({rng_option: None} if cls.spec.samples else {})}
    cls.samples, cls.observes_outputs = cls.spec.samples, cls.spec.observes_outputs


def estimator_options(spec: EstimatorSpec, config: RouterConfig, options: dict, rng_option: str,
                      check_rng: Callable, hint: str = "") -> dict:
    """Validate the keyword options of the estimator ``spec`` -> {option: value} with defaults.

    ``rng_option`` is the framework's random-number option (``"generator"`` in PyTorch,
    ``"seed"`` in MLX), taken by sampling estimators only and checked by ``check_rng(value)``.
    Unknown options are a TypeError listing the known ones (``hint`` is appended); a sampling
    estimator with group-limited top-k, a selection bias or ``routing="sinkhorn"`` is a
    ValueError.
    """
    name = spec.name
    known = dict(spec.options)
    if spec.samples:
        known[rng_option] = (None, lambda _, value: value if value is None else check_rng(value))
    unknown = sorted(set(options) - set(known))
    if unknown:
        allowed = sorted(known) or "none"
        raise TypeError(f"estimator {name!r} got unknown option(s) {unknown}; its options are: "
                        f"{allowed}{hint}")
    if spec.samples and (config.grouped or config.selection_bias):
        raise ValueError(
            f"estimator {name!r} samples its selection, which group-limited top-k "
            "(n_group/topk_group) and selection_bias cannot be combined with; use a "
            f"deterministic estimator {list(DETERMINISTIC)} there")
    if config.routing == "expert_choice" and name not in EXPERT_CHOICE_ESTIMATORS:
        raise ValueError(
            f"estimator {name!r} with routing='expert_choice': the estimators' maths is about a "
            "token choosing K experts, while under expert choice the experts choose tokens and "
            "the weights are the gathered scores with plain autograd; use estimator="
            f"{' or '.join(repr(e) for e in EXPERT_CHOICE_ESTIMATORS)}")
    if spec.samples and config.routing != "topk":
        raise ValueError(
            f"estimator {name!r} samples its selection, so routing={config.routing!r} (which "
            "changes the deterministic top-k an estimator takes from Selection.select_topk) "
            f"cannot apply to it; use routing='topk', or one of {list(DETERMINISTIC)}")
    values = {}
    for key, (default, check) in known.items():
        values[key] = check(key, options[key]) if key in options else default
    warn_if_no_task_gradient(name, config, values)
    return values


class EstimatorOptions:
    """The framework-free half of an estimator class: both frameworks' ``Estimator`` derive
    from it and from their ``nn.Module``.

    A framework's base class sets ``rng_option`` (``"generator"`` / ``"seed"``) and
    ``check_rng``; every class derived from it gets, when it is defined, its spec and the class
    attributes read from it (:func:`attach_spec`). :meth:`set_options` validates a call's
    keyword options (:func:`estimator_options`) and stores each as an attribute."""

    name: ClassVar[str] = ""
    #: option name -> default (from the spec; plus ``rng_option`` for sampling estimators)
    options: ClassVar[dict] = {}
    #: draws random numbers in training mode (refuses group-limited top-k and selection bias)
    samples: ClassVar[bool] = False
    #: wants per-expert sums of expert outputs (``observe``) in training mode
    observes_outputs: ClassVar[bool] = False
    #: the validated option table (:data:`ESTIMATORS`, or the class's own options)
    spec: ClassVar[EstimatorSpec]
    #: the framework's random-number option, set by the framework's base class
    rng_option: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "rng_option" not in cls.__dict__:  # the framework's base class is no estimator itself
            attach_spec(cls, cls.rng_option)

    @staticmethod
    def check_rng(value):
        """The framework's check of a non-None ``rng_option`` value -> the value."""
        raise NotImplementedError

    def set_options(self, config: RouterConfig, options: dict, hint: str = "") -> None:
        """Validate ``options`` for ``config`` and set ``self.config`` and one attribute per option."""
        values = estimator_options(self.spec, config, options, self.rng_option, self.check_rng, hint)
        self.config = config
        for key, value in values.items():
            setattr(self, key, value)

    def option_values(self) -> dict:
        """{option: value} as configured (what from_torch/to_torch carry over)."""
        return {k: getattr(self, k) for k in self.options}

    def options_repr(self, exclude: tuple = ()) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.option_values().items() if k not in exclude)


class Registry(NamedTuple):
    """A framework's estimator catalogue: ``classes`` {name: class} and three functions."""

    classes: dict
    available: Callable
    get: Callable
    build_estimator: Callable


def make_registry(classes) -> Registry:
    """A framework's estimator classes (one per name of :data:`ESTIMATORS`) -> :class:`Registry`.

    Used as ``REGISTRY, available, get, build_estimator = make_registry((TopK, ...))``."""
    registry = {cls.name: cls for cls in classes}
    if set(registry) != set(ESTIMATORS):
        raise ValueError(f"estimator classes {sorted(registry)} do not match the spec's names "
                         f"{estimator_names()}")

    def available() -> list[str]:
        """Sorted names of every estimator (:func:`moegrad._spec.estimator_names`)."""
        return estimator_names()

    def get(name: str):
        """The estimator class registered under ``name`` (ValueError listing the names otherwise)."""
        return registry[estimator_spec(name).name]

    def build_estimator(name: str, config: RouterConfig, **options):
        """The estimator ``name`` for ``config``, with its keyword ``options``."""
        return get(name)(config, **options)

    return Registry(registry, available, get, build_estimator)


#: estimators that give the router a task gradient where the combine weight is a constant
FIXES_CONSTANT_WEIGHT = ("default_moe", "dense", "sparsemixer", "straight_through")


def no_task_gradient(name: str, config: RouterConfig, options: dict) -> bool:
    """True when ``name`` under ``config`` gives the router exactly no task gradient although
    it is meant to learn from one: with K = 1 the only combine weight is the constant c for
    ``topk`` and ``gumbel`` with ``normalize=True`` (s_i / s_i) and for ``noisy_topk`` always
    (a softmax over the one kept logit). (``unweighted`` never has one, by design.)"""
    if config.top_k != 1:
        return False
    if name == "noisy_topk":
        return True
    return config.normalize and name in ("topk", "gumbel")


def warn_if_no_task_gradient(name: str, config: RouterConfig, options: dict) -> None:
    """A UserWarning when :func:`no_task_gradient` holds, naming the estimators that fix it."""
    if no_task_gradient(name, config, options):
        why = ("a softmax over the one kept logit" if name == "noisy_topk" else
               "s_i / s_i with normalize=True")
        warnings.warn(
            f"estimator={name!r} with top_k=1 gives the router no task gradient: its only combine "
            f"weight ({why}) is the constant routed_scaling_factor, so the router learns only "
            "from balance losses. "
            f"Use one of {list(FIXES_CONSTANT_WEIGHT)}"
            + (" (or normalize=False)" if name != "noisy_topk" else ""),
            UserWarning, stacklevel=_caller_stacklevel())


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside moegrad (the
    user's line that built the layer, or transformers' / the test's)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def dense_chunk_tokens(chunk_tokens: Optional[int], dim: int, hidden_dim: int,
                       num_experts: int) -> int:
    """Tokens per chunk of ``dense``'s unselected-expert evaluation: ``chunk_tokens`` when set,
    else enough for about 16M elements of [t, E, max(D, H)]."""
    if chunk_tokens is not None:
        return chunk_tokens
    return max(1, (1 << 24) // (max(dim, hidden_dim) * num_experts))


# ----------------------------------------------------------------------------- balance losses
#: loss name -> the name of its function in each framework's losses module
LOSS_FUNCTIONS = {"switch": "switch_loss", "switch_megatron": "switch_megatron_loss",
                  "z_loss": "z_loss", "importance_load": "importance_load_loss",
                  "seq_aux": "seq_aux_loss"}
LOSS_NAMES = tuple(sorted(LOSS_FUNCTIONS))


def loss_names() -> list[str]:
    """Sorted names of the balance losses."""
    return sorted(LOSS_NAMES)


def bind_losses(namespace: dict) -> dict[str, Callable]:
    """{loss name: function} with the functions looked up by :data:`LOSS_FUNCTIONS` in
    ``namespace`` (a framework's losses module: ``LOSSES = bind_losses(globals())``)."""
    return {name: namespace[function] for name, function in LOSS_FUNCTIONS.items()}


#: losses that need a particular estimator (the one that produces what they read)
LOSS_NEEDS_ESTIMATOR = {"importance_load": "noisy_topk"}


def check_losses(losses, estimator: str, routing: str = "topk") -> dict[str, float]:
    """Validate ``{name: coefficient}`` for a layer using ``estimator`` and ``routing``
    -> {name: float}; the routings of :data:`ROUTING_LOSSES` take only the losses named there."""
    if losses is None:
        return {}
    if not isinstance(losses, dict):
        raise TypeError(f"losses must be a dict {{name: coefficient}}, got {type(losses).__name__}; "
                        f"names: {list(LOSS_NAMES)}")
    out = {}
    for name, coef in losses.items():
        if name not in LOSS_NAMES:
            raise ValueError(f"loss {name!r} is unknown; choose from {list(LOSS_NAMES)}")
        check_float(f"losses[{name!r}]", coef, low=0.0)
        out[name] = float(coef)
    if routing in ROUTING_LOSSES:
        allowed = ROUTING_LOSSES[routing]
        bad = sorted(set(out) - set(allowed))
        if bad:
            why = ("expert choice is balanced by construction (every expert takes exactly c "
                   "tokens), so the balance losses have nothing to balance"
                   if routing == "expert_choice" else
                   "ReMoE balances with its own load-weighted L1 penalty on the ReLU gates (the "
                   "other losses read softmax-like scores, which ReLU gates are not)")
            raise ValueError(f"losses {bad} with routing={routing!r}: {why}; allowed: "
                             f"{list(allowed)} (or {{}})")
    for name in out:
        needs = LOSS_NEEDS_ESTIMATOR.get(name)
        if needs is not None and estimator != needs:
            raise ValueError(f"the {name} loss needs estimator={needs!r} (its smooth load), "
                             f"got estimator={estimator!r}")
    return out


def selection_bias_routers(module, module_type: type, is_router: Callable[[object], bool],
                           module_kind: str, router_kind: str, owner: str = "BiasBalancer") -> list:
    """The routers (``is_router(m)`` true) in ``module`` built with ``selection_bias=True``.

    ``module`` must be a ``module_type`` (TypeError naming ``owner``, ``module_kind``, e.g.
    "nn.Module", and the routers it should hold, ``router_kind``, e.g. "moegrad"); a module
    without such a router is a ValueError naming the fix."""
    if not isinstance(module, module_type):
        hint = "; pass the model (or one layer) itself" if isinstance(module, (list, tuple)) else ""
        raise TypeError(f"{owner}(module=...) takes an {module_kind} holding {router_kind} "
                        f"Routers built with selection_bias=True (a Router, an MoE or a whole "
                        f"model), got {type(module).__name__}{hint}")
    routers = [m for m in module.modules() if is_router(m) and m.config.selection_bias]
    if not routers:
        raise ValueError(f"{type(module).__name__} holds no Router with a selection bias; "
                         f"build it with selection_bias=True ({owner} sets that bias)")
    return routers


def balanced_routers(module, gamma, module_type: type, is_router: Callable[[object], bool],
                     module_kind: str, router_kind: str) -> tuple[float, list]:
    """A ``BiasBalancer(module, gamma)``'s arguments checked -> (gamma as a float, the routers of
    in ``module`` (``is_router(m)`` true) built with ``selection_bias=True``).

    ``module`` must be a ``module_type`` (TypeError naming ``module_kind``, e.g. "nn.Module",
    and the routers it should hold, ``router_kind``, e.g. "moegrad"); ``gamma`` >= 0; a module
    without such a router is a ValueError."""
    routers = selection_bias_routers(module, module_type, is_router, module_kind, router_kind)
    check_float("gamma", gamma, low=0.0)
    return float(gamma), routers


#: QuantileBalancer's default number of histogram bins per expert
QUANTILE_BINS = 4096


def quantile_balanced_routers(module, bins, module_type: type, is_router: Callable[[object], bool],
                              module_kind: str, router_kind: str) -> tuple[int, list]:
    """A ``QuantileBalancer(module, bins)``'s arguments checked -> (bins, the routers).

    ``bins`` is an int >= 2; every router needs top_k < num_experts (with K == E every expert
    takes every token: the (K+1)-th score and the K/E quantile are undefined)."""
    routers = selection_bias_routers(module, module_type, is_router, module_kind, router_kind,
                                     owner="QuantileBalancer")
    check_int("bins", bins, 2)
    full = [r for r in routers if r.config.top_k >= r.config.num_experts]
    if full:
        c = full[0].config
        raise ValueError(f"QuantileBalancer needs top_k < num_experts, got top_k={c.top_k} with "
                         f"num_experts={c.num_experts} in {len(full)} router(s): every expert "
                         "already takes every token (no (K+1)-th score, no K/E quantile to balance)")
    return bins, routers


def quantile_range(bias_min: float, bias_max: float) -> tuple[float, float]:
    """The histogram range [lo, hi) of d_tj = alpha_t - s_tj for a bias with these extremes.

    Scores are in [0, 1] (softmax or sigmoid at any temperature) and alpha_t, the (K+1)-th
    largest biased score s_t + b, lies in [min_j s_tj + b_min, max_j s_tj + b_max], so
    d in [b_min - 1, b_max + 1]: nothing is clamped. The bias changes only in ``step()``, so one
    step's histograms (every micro-batch, every rank: all hold the same bias) share one range."""
    return float(bias_min) - 1.0, float(bias_max) + 1.0


def quantile_step_range(current: Optional[tuple], extremes: tuple, bins: int, router: int) -> tuple:
    """A QuantileBalancer's histogram range for this step: ``current`` (lo, bin width, the
    bias extremes it was set from) or, at the step's first forward (None), the range
    :func:`quantile_range` gives for the bias ``extremes`` (b_min, b_max); a later forward's
    bias is checked against the first extremes (:func:`check_quantile_bias`)."""
    if current is None:
        lo, hi = quantile_range(*extremes)
        return lo, (hi - lo) / bins, extremes
    check_quantile_bias(router, *extremes, current[2])
    return current


def check_quantile_bias(router: int, bias_min: float, bias_max: float, first: tuple) -> None:
    """A QuantileBalancer's histogram range holds for every bias inside the extremes ``first``
    (b_min, b_max) the step began with; a bias moved outside them since (a user's edit,
    ``load_state_dict``, a second balancer) would put values outside the range, which must
    not be clamped into the end bins silently: ValueError saying how to fix it."""
    if bias_min < first[0] or bias_max > first[1]:
        raise ValueError(
            f"QuantileBalancer: the selection bias of router {router} changed during a step (its "
            f"range went from [{first[0]:.6g}, {first[1]:.6g}] to [{bias_min:.6g}, {bias_max:.6g}]); "
            "the balancer sets the bias in step() and its histograms assume it stays until then. "
            "Change the bias only right after step() (or call reset()), and attach no other "
            "balancer to the same routers")


def quantile_rank(top_k: int, num_experts: int, num_tokens: int) -> int:
    """m = ceil(K N / E), in integers: the 1-based rank of the K/E quantile of N values.

    The bias of an expert is its m-th smallest d_tj = alpha_t - s_tj (the K/E quantile, "inverted
    CDF" rule: the smallest value with at least K N / E values <= it). Token t picks expert j
    when s_tj + b_j > alpha_t, i.e. d_tj < b_j: about K N / E tokens, the balanced load."""
    return -(-top_k * num_tokens // num_experts)


def histogram_quantile(counts: list, rank: int, lo: float, width: float) -> float:
    """Plain-list statement of the rule both frameworks implement with cumsum + searchsorted:
    the centre of the first bin whose cumulative count reaches ``rank`` (>= 1). The m-th
    smallest value lies in that bin, so the result is within width / 2 of it."""
    total = 0
    for i, c in enumerate(counts):
        total += c
        if total >= rank:
            return lo + (i + 0.5) * width
    raise ValueError(f"rank={rank} exceeds the {total} values in the histogram")


# ----------------------------------------------------------------------------- dispatch
def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """ceil(capacity_factor * T * K / E): the (token, slot) pairs each expert keeps."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def expert_choice_capacity(capacity_factor: Optional[float], num_tokens: int, top_k: int,
                           num_experts: int) -> int:
    """Tokens each expert takes under expert choice: c = min(ceil(f * T * K / E), T) with
    f = ``capacity_factor`` (1 when None) and T the real tokens (Zhou et al. 2022, k = n c / e)."""
    f = 1.0 if capacity_factor is None else capacity_factor
    return min(math.ceil(f * num_tokens * top_k / num_experts), num_tokens)


def check_capacity_factor(capacity_factor) -> Optional[float]:
    """None (dropless) or a finite number > 0."""
    if capacity_factor is not None:
        check_float("capacity_factor", capacity_factor, low=0.0, low_open=True)
    return capacity_factor
