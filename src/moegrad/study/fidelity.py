"""Gradient fidelity on shared checkpoints: every estimator measured on the same models.

Shapes: T tokens, D model dim, E experts, K top-k, R samples.

Measuring each estimator on its own training trajectory mixes two things: how good its
gradient is, and where its training has taken the model. At step 0 in particular the study's
router is zero, every score is 1/E, and ``dense``'s gradient is close to the exact one there
(cosine 0.999 on ``clusters``) whatever it does later, while the estimators' later checkpoints
differ. Here every estimator's router gradient is taken
on the same checkpoints (the same gate and expert weights, the same probe batch x [T, D] and
per-token losses) and compared with the exact gradient of the expected loss of the sampled
top-k policy softmax(z / tau) (:func:`moegrad.diagnostics.reference_gradients`, every subset
enumerated), under the estimator's own forward weight rule, as
:func:`moegrad.diagnostics.gradient_fidelity` does:

    cos_exact[tau][c] = cos(gbar, dJ_tau/dz)   gbar [T, E] = mean of R sampled gradients,
    mean_after_step0[tau] = mean of cos_exact[tau][c] over the checkpoints c with step > 0,
    step0[tau]            = mean over the step-0 checkpoints (None if there is none),

and ``zero_gradient_at`` lists the checkpoints where the estimator's router gradient is
identically zero (every sample; float32 rounding noise below ``ZERO_TOL`` times the exact
gradient's norm counts as zero), e.g. ``topk`` with K = 1 and renormalised weights (w = 1 for
every token), or ``sparsemixer`` once its relative mask leaves one candidate per token.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Optional, Sequence

import torch

from moegrad import estimators as registry
from moegrad._checks import check_float, check_int
from moegrad.diagnostics import estimator_gradients, fidelity, reference_gradients, weight_rule
from moegrad.routing import is_router

__all__ = ["shared_checkpoint_fidelity", "load_checkpoint"]


def _estimator_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """state_dict prefixes of the estimators' own state (one per router)."""
    return tuple(f"{name}.estimator." if name else "estimator."
                 for name, m in model.named_modules() if is_router(m))


def load_checkpoint(model: torch.nn.Module, state: Mapping, label: str = "checkpoint") -> bool:
    """Load a training checkpoint's ``state`` (a state_dict) into ``model``, a fresh model of the
    same task built with possibly another estimator. Returns whether the estimator's own state
    came from the checkpoint.

    Every parameter and buffer outside the estimators (gate, experts, load counts, ...) must be
    in ``state`` with the same shape (ValueError otherwise). The estimators' own state
    (``...router.estimator.*``: ``noisy_topk``'s learned ``w_noise``, ``default_moe``'s EMA
    ``defaults``/``seen``) is loaded only when ``state`` holds all of the model's estimator keys
    with the same shapes (a checkpoint of a run with that estimator); otherwise it keeps the fresh
    values of the build, and the estimator keys of the checkpoint's own estimator are ignored.
    """
    prefixes = _estimator_prefixes(model)
    is_est = lambda k: k.startswith(prefixes)  # noqa: E731
    mine = model.state_dict()
    layer_keys = {k for k in mine if not is_est(k)}
    missing = sorted(layer_keys - set(state))
    unexpected = sorted(k for k in state if k not in mine and not is_est(k))
    if missing or unexpected:
        raise ValueError(f"checkpoint {label!r} does not fit the task's model: missing {missing}, "
                         f"unexpected {unexpected}")
    shapes = [k for k in layer_keys if tuple(state[k].shape) != tuple(mine[k].shape)]
    if shapes:
        raise ValueError(f"checkpoint {label!r} has other shapes than the task's model for "
                         f"{sorted(shapes)}")
    est_keys = [k for k in mine if is_est(k)]
    own = bool(est_keys) and all(k in state and tuple(state[k].shape) == tuple(mine[k].shape)
                                 for k in est_keys)
    keep = layer_keys | (set(est_keys) if own else set())
    model.load_state_dict({k: state[k] for k in keep}, strict=False)
    return own


def _check_checkpoints(checkpoints) -> list:
    if not isinstance(checkpoints, Sequence) or isinstance(checkpoints, (str, bytes)) or not checkpoints:
        raise ValueError("checkpoints must be a non-empty list of {'label', 'step', 'state'} dicts, "
                         f"got {type(checkpoints).__name__} ({checkpoints!r:.60})")
    seen = set()
    for i, c in enumerate(checkpoints):
        if not isinstance(c, Mapping) or not {"label", "step", "state"} <= set(c):
            keys = sorted(c) if isinstance(c, Mapping) else None
            raise ValueError(f"checkpoints[{i}] must be a dict with keys 'label', 'step', 'state'; "
                             f"got {type(c).__name__} with keys {keys}")
        if not isinstance(c["label"], str):
            raise TypeError(f"checkpoints[{i}]['label'] must be a str, got {type(c['label']).__name__}")
        check_int(f"checkpoints[{i}]['step']", c["step"], 0)
        if not isinstance(c["state"], Mapping):
            raise TypeError(f"checkpoints[{i}]['state'] must be a state_dict (a mapping), got "
                            f"{type(c['state']).__name__}")
        if c["label"] in seen:
            raise ValueError(f"checkpoints[{i}]['label']={c['label']!r} is used twice; labels must "
                             "be unique (zero_gradient_at names checkpoints by label)")
        seen.add(c["label"])
    return list(checkpoints)


def _mean(values: list) -> Optional[float]:
    return sum(values) / len(values) if values else None


def shared_checkpoint_fidelity(task, checkpoints, estimators, *, taus=(1.0,), samples: int = 8,
                               seed: int = 0, options: Optional[dict] = None) -> dict:
    """Every estimator's router gradient on every checkpoint, against the exact gradient at each tau.

    ``task``: a :class:`moegrad.study.task.Task` with a probe (e.g. ``clusters``; a task whose
    exact gradient is not enumerable, such as ``charlm``, raises ValueError). ``checkpoints``:
    ``[{"label": str, "step": int, "state": state_dict}]`` of models trained on ``task`` (unique
    labels). ``estimators``: names; ``taus``: temperatures of the reference's sampling policy;
    ``samples``: R draws for sampling estimators (seeded by ``seed``, the same draws on every
    checkpoint); ``options``: ``{estimator: {option: value}}`` as given to the training runs
    (all passed to ``task.build``; the estimator's own options also to its gradient twin).

    For each checkpoint and estimator the model is built by ``task.build(name, options, {},
    seed)`` and the checkpoint loaded with :func:`load_checkpoint` (estimator-specific state,
    ``noisy_topk``'s ``w_noise`` or ``default_moe``'s EMA, comes from the checkpoint only if it
    was taken from a run with that estimator; otherwise ``w_noise`` keeps its zero init and
    ``default_moe``'s EMA is filled by one training-mode forward of the probe layer on the probe
    batch, under no_grad, as the first training step would fill it). The gradients are those of
    :func:`moegrad.diagnostics.gradient_fidelity` (same twin, samples and seed); the exact
    reference of each (checkpoint, weight rule, tau) is computed once and shared by the
    estimators. The caller's global RNG state is left unchanged.

    Returns ``{"taus": [...], "samples": R, "seed": seed, "checkpoints": [{"label", "step"}],
    "estimators": {name: {...}}}``, per estimator: ``"cos_exact": {tau: [per checkpoint]}``,
    ``"sample_cos_exact": {tau: [...]}`` (mean cosine of single samples, what one training step
    sees), ``"cos_dense": [...]`` (against the dense-mixture gradient, independent of tau),
    ``"mean_after_step0": {tau: float | None}``, ``"step0": {tau: float | None}`` (None where no
    checkpoint has step > 0, resp. step 0), ``"zero_gradient_at": [labels]``, ``"reference"``
    (the exact reference's weight rule, :attr:`WeightRule.label`) and
    ``"state_from_checkpoint": [labels]``. The tau keys are floats (strings once through JSON).
    """
    names = list(estimators) if not isinstance(estimators, str) else [estimators]
    if not names:
        raise ValueError("estimators must name at least one estimator, e.g. ['topk', 'dense']")
    for name in names:
        registry.get(name)
    taus = [taus] if isinstance(taus, (int, float)) else list(taus)
    if not taus:
        raise ValueError("taus must hold at least one temperature > 0, e.g. (1.0,)")
    for i, tau in enumerate(taus):
        check_float(f"taus[{i}]", tau, low=0.0, low_open=True)
    taus = [float(t) for t in taus]
    check_int("samples", samples, 1)
    check_int("seed", seed, 0)
    checkpoints = _check_checkpoints(checkpoints)
    options = dict(options or {})
    per = {n: {"cos_exact": {t: [] for t in taus}, "sample_cos_exact": {t: [] for t in taus},
               "cos_dense": [], "zero_gradient_at": [], "reference": None,
               "state_from_checkpoint": []}
           for n in names}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # measured on purpose: the zero gradient is what zero_gradient_at reports
        warnings.filterwarnings("ignore", "estimator=.* gives the router no task gradient", UserWarning)
        for ckpt in checkpoints:
            refs: dict = {}
            for name in names:
                opts = {k: v for k, v in options.get(name, {}).items() if k != "generator"}
                model = task.build(name, dict(opts), {}, seed)
                # the twin copies the layer options (normalize, score, ...) from the model itself
                est_opts = {k: v for k, v in opts.items() if k in registry.get(name).options}
                own = load_checkpoint(model, ckpt["state"], ckpt["label"])
                probe = task.probe(model)
                if probe is None:
                    raise ValueError(f"task {getattr(task, 'name', type(task).__name__)!r} has no "
                                     "probe: its exact router gradient is not enumerable (use "
                                     "a task such as 'clusters')")
                moe = probe.moe
                if own:
                    per[name]["state_from_checkpoint"].append(ckpt["label"])
                elif moe.router.estimator.observes_outputs:
                    with torch.no_grad():
                        moe.train()(probe.x)
                rule = weight_rule(moe.router.estimator)
                grads, gate = estimator_gradients(moe, probe.x, probe.loss_fn, name,
                                                  samples=samples, seed=seed, **est_opts)
                zero = None
                for tau in taus:
                    if (rule, tau) not in refs:
                        refs[rule, tau] = reference_gradients(moe, probe.x, probe.loss_fn, tau=tau,
                                                              rule=rule)
                    fid = fidelity(grads, gate, refs[rule, tau], name)
                    per[name]["cos_exact"][tau].append(fid.cos_exact)
                    per[name]["sample_cos_exact"][tau].append(fid.sample_cos_exact)
                    per[name]["reference"] = fid.reference
                    zero = fid.zero if zero is None else zero and fid.zero
                per[name]["cos_dense"].append(fid.cos_dense)
                if zero:
                    per[name]["zero_gradient_at"].append(ckpt["label"])
    first = [c["step"] == 0 for c in checkpoints]
    for d in per.values():
        d["step0"] = {t: _mean([v for v, f in zip(d["cos_exact"][t], first) if f]) for t in taus}
        d["mean_after_step0"] = {t: _mean([v for v, f in zip(d["cos_exact"][t], first) if not f])
                                 for t in taus}
    return {"taus": taus, "samples": samples, "seed": seed,
            "checkpoints": [{"label": c["label"], "step": c["step"]} for c in checkpoints],
            "estimators": per}
