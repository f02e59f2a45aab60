"""The framework-free spec (moegrad._spec): one table of bad inputs run against PyTorch and MLX,
registries that agree with the spec, the tempered-logits check, the top-1 no-gradient warning
and the sampling estimators' random-number option."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import pytest
import torch

import moegrad
from moegrad import _spec

try:
    import mlx.core as mx

    import moegrad.mlx as mmlx
except ImportError:  # pragma: no cover - MLX is in the test extra on Linux and macOS
    mx = mmlx = None

FRAMEWORKS = ["torch", "mlx"]


def build(framework: str, **kwargs):
    """A small MoE (D=8, H=16, E=4, K=2 unless overridden) of either framework."""
    args = {"dim": 8, "hidden_dim": 16, "num_experts": 4, "top_k": 2, **kwargs}
    if framework == "mlx":
        if mmlx is None:
            pytest.skip("mlx is not installed")
        return mmlx.MoE(**args)
    return moegrad.MoE(**args)


# (constructor keyword arguments, exception type, text the message must contain)
BAD_INPUTS = [
    ({"normalize": "false"}, TypeError, "normalize"),
    ({"selection_bias": "no"}, TypeError, "selection_bias"),
    ({"check_finite": "False"}, TypeError, "check_finite"),
    ({"estimator": "gumbel", "hard": "false"}, TypeError, "hard"),
    ({"estimator": "default_moe", "forward_defaults": "false"}, TypeError, "forward_defaults"),
    ({"normalize": 2}, TypeError, "normalize"),
    ({"dim": 0}, ValueError, "dim"),
    ({"top_k": 0}, ValueError, "top_k"),
    ({"top_k": 5}, ValueError, "top_k"),
    ({"top_k": 1.5}, TypeError, "top_k"),
    ({"score": "relu"}, ValueError, "score"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"routed_scaling_factor": -1.0}, ValueError, "routed_scaling_factor"),
    ({"n_group": 2}, ValueError, "topk_group"),
    ({"n_group": 3, "topk_group": 1}, ValueError, "n_group"),
    ({"estimator": "nope"}, ValueError, "choose one of"),
    ({"estimator": 3}, ValueError, "estimator"),
    ({"estimator": "dense", "chunk_tokens": 0}, ValueError, "chunk_tokens"),
    ({"estimator": "dense", "chunk_tokens": 1.5}, TypeError, "chunk_tokens"),
    ({"estimator": "default_moe", "beta": 1.0}, ValueError, "beta"),
    ({"estimator": "gumbel", "tau": 0.0}, ValueError, "tau"),
    ({"estimator": "noisy_topk", "noise_epsilon": -1.0}, ValueError, "noise_epsilon"),
    ({"estimator": "sparsemixer", "jitter_eps": "x"}, TypeError, "jitter_eps"),
    ({"estimator": "topk", "tau": 1.0}, TypeError, "unknown option"),
    ({"estimator": "gumbel", "selection_bias": True}, ValueError, "deterministic estimator"),
    ({"estimator": "sparsemixer", "n_group": 2, "topk_group": 1}, ValueError, "samples"),
    ({"losses": {"nope": 1.0}}, ValueError, "unknown"),
    ({"losses": [("switch", 1.0)]}, TypeError, "losses"),
    ({"losses": {"switch": -1.0}}, ValueError, "switch"),
    ({"losses": {"importance_load": 1.0}}, ValueError, "noisy_topk"),
    ({"capacity_factor": 0.0}, ValueError, "capacity_factor"),
    ({"capacity_factor": "1"}, TypeError, "capacity_factor"),
    ({"routing": "nope"}, ValueError,
     r"routing='nope' is unknown; choose one of \['expert_choice', 'remoe', 'sinkhorn', 'topk'\]"),
    ({"routing": None}, ValueError, "routing=None"),
    ({"routing": "expert_choice", "estimator": "gumbel"}, ValueError,
     "estimator 'gumbel' with routing='expert_choice'.*use estimator='topk'"),
    ({"routing": "expert_choice", "estimator": "straight_through"}, ValueError,
     "estimator 'straight_through' with routing='expert_choice'"),
    ({"routing": "expert_choice", "estimator": "dense"}, ValueError,
     "estimator 'dense' with routing='expert_choice'"),
    ({"routing": "expert_choice", "selection_bias": True}, ValueError,
     "routing='expert_choice' with selection_bias=True"),
    ({"routing": "expert_choice", "n_group": 2, "topk_group": 1}, ValueError,
     "routing='expert_choice' with n_group=2"),
    ({"routing": "expert_choice", "normalize": True}, ValueError,
     "routing='expert_choice' with normalize=True"),
    ({"routing": "expert_choice", "losses": {"switch": 1e-2}}, ValueError,
     r"losses \['switch'\] with routing='expert_choice'.*allowed: \['z_loss'\]"),
    ({"routing": "expert_choice", "capacity_factor": 0.0}, ValueError, "capacity_factor"),
    ({"routing": "remoe", "estimator": "topk"}, ValueError,
     "routing='remoe' with estimator='topk'.*leave estimator unset"),
    ({"routing": "remoe", "estimator": "dense"}, ValueError, "routing='remoe' with estimator='dense'"),
    ({"routing": "remoe", "score": "softmax"}, ValueError, "routing='remoe' with score='softmax'"),
    ({"routing": "remoe", "normalize": True}, ValueError, "routing='remoe' with normalize=True"),
    ({"routing": "remoe", "selection_bias": True}, ValueError, "routing='remoe' with selection_bias=True"),
    ({"routing": "remoe", "n_group": 2, "topk_group": 1}, ValueError, "routing='remoe' with n_group=2"),
    ({"routing": "remoe", "capacity_factor": 1.0}, ValueError,
     "routing='remoe' with capacity_factor=1.0: ReMoE is dropless"),
    ({"routing": "remoe", "losses": {"switch": 1e-2}}, ValueError,
     r"losses \['switch'\] with routing='remoe'.*allowed: \['z_loss'\]"),
    ({"routing": "remoe", "l1_alpha": 1.0}, ValueError, "l1_alpha=1.0 is out of range"),
    ({"routing": "remoe", "l1_init": 0.0}, ValueError, "l1_init=0.0 is out of range"),
    ({"l1_init": 1e-3}, ValueError, "l1_init=0.001 applies to routing='remoe' only"),
    ({"routing": "topk", "score": "relu"}, ValueError, "score='relu'"),
    ({"routing": "sinkhorn", "selection_bias": True}, ValueError, "routing='sinkhorn' with selection_bias"),
    ({"routing": "sinkhorn", "estimator": "gumbel"}, ValueError, "samples its selection"),
    ({"routing": "sinkhorn", "estimator": "noisy_topk"}, ValueError, "routing='sinkhorn'"),
    ({"routing": "sinkhorn", "estimator": "sparsemixer"}, ValueError, "routing='sinkhorn'"),
]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("kwargs,error,text", BAD_INPUTS,
                         ids=[f"{i}-{sorted(k)}" for i, (k, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_table_is_refused_alike_by_both_frameworks(framework, kwargs, error, text):
    with pytest.raises(error, match=text):
        build(framework, **kwargs)


def test_registries_of_both_frameworks_are_the_spec():
    spec_names = set(_spec.ESTIMATORS)
    assert set(moegrad.estimators.REGISTRY) == spec_names
    assert set(moegrad.losses.LOSSES) == set(_spec.LOSS_NAMES)
    for name, cls in moegrad.estimators.REGISTRY.items():
        spec = _spec.ESTIMATORS[name]
        assert cls.samples == spec.samples and cls.observes_outputs == spec.observes_outputs
        assert cls.options == {**spec.defaults(), **({"generator": None} if spec.samples else {})}
    if mmlx is None:
        pytest.skip("mlx is not installed")
    assert set(mmlx.estimators.REGISTRY) == spec_names
    assert set(mmlx.losses.LOSSES) == set(_spec.LOSS_NAMES)
    for name, cls in mmlx.estimators.REGISTRY.items():
        spec = _spec.ESTIMATORS[name]
        assert cls.samples == spec.samples and cls.observes_outputs == spec.observes_outputs
        assert cls.options == {**spec.defaults(), **({"seed": None} if spec.samples else {})}


def test_router_and_layer_signatures_of_both_frameworks_default_to_the_router_config():
    """Each framework declares the Router / MoE keywords in its signature (DESIGN.md section 3);
    their defaults are RouterConfig's, in both frameworks."""
    defaults = {f.name: f.default for f in dataclasses.fields(_spec.RouterConfig)
                if f.default is not dataclasses.MISSING}
    classes = [moegrad.Router, moegrad.MoE] + ([] if mmlx is None else [mmlx.Router, mmlx.MoE])
    for cls in classes:
        params = inspect.signature(cls.__init__).parameters
        assert {k: params[k].default for k in defaults} == defaults, cls
        assert params["estimator"].default is None, cls  # "topk", except under routing="remoe"
    assert _spec.resolve_estimator(None, "topk") == _spec.resolve_estimator(None, "remoe") == "topk"
    assert _spec.resolve_estimator("dense", "sinkhorn") == "dense"
    assert moegrad.Router(8, 4, 2).estimator.name == "topk"
    assert moegrad.Router(8, 4, 2).config.score == "softmax"
    assert moegrad.Router(8, 4, 2, routing="remoe").config.score == "relu"


def test_registry_and_loss_table_are_built_from_the_spec():
    class Odd:
        name = "odd"

    with pytest.raises(ValueError, match=r"do not match the spec's names"):
        _spec.make_registry([Odd])
    assert moegrad.estimators.available() == _spec.estimator_names()
    with pytest.raises(ValueError, match="estimator='nope' is unknown"):
        moegrad.estimators.get("nope")
    assert _spec.bind_losses({f: f.upper() for f in _spec.LOSS_FUNCTIONS.values()})["switch"] == "SWITCH_LOSS"
    assert moegrad.losses.available() == _spec.loss_names() == sorted(_spec.LOSS_NAMES)
    if mmlx is None:
        pytest.skip("mlx is not installed")
    assert mmlx.estimators.available() == _spec.estimator_names()
    assert mmlx.losses.available() == _spec.loss_names()
    assert mmlx.losses.LOSSES["seq_aux"] is mmlx.losses.seq_aux_loss


def test_options_are_stored_as_given_and_defaults_filled():
    moe = moegrad.MoE(8, 16, 4, 2, estimator="default_moe", beta=0.5)
    assert moe.estimator.beta == 0.5 and moe.estimator.forward_defaults is False
    moe = moegrad.MoE(8, 16, 4, 2, estimator="gumbel", hard=1)
    assert moe.estimator.hard is True and moe.estimator.tau == 1.0


# ----------------------------------------------------------------------------- item 5: temperature
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_temperature_that_overflows_finite_logits_is_refused(framework):
    moe = build(framework, temperature=1e-45)
    if framework == "torch":
        torch.manual_seed(0)
        x = torch.randn(5, 8)
    else:
        x = mx.random.normal((5, 8), key=mx.random.key(0))
    with pytest.raises(ValueError, match=r"temperature=1e-45 makes the finite router logits of 5 of 5"):
        moe(x)


def test_non_finite_input_still_names_the_input_not_the_temperature():
    moe = moegrad.MoE(8, 16, 4, 2, temperature=0.5)
    x = torch.randn(3, 8)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite for 1 of 3 tokens"):
        moe(x)


def test_a_small_but_safe_temperature_runs_and_gives_hard_top_k():
    torch.manual_seed(0)
    router = moegrad.Router(8, 4, 1, temperature=1e-6)
    r = router(torch.randn(16, 8))
    assert torch.isfinite(r.scores).all()
    assert torch.equal(r.scores.argmax(-1), r.logits.argmax(-1))
    assert torch.allclose(r.scores.max(-1).values, torch.ones(16))


# ----------------------------------------------------------------------------- item 8: top-1 warning
WARNED = [({"estimator": "topk", "top_k": 1, "normalize": True}),
          ({"estimator": "gumbel", "top_k": 1, "normalize": True}),
          ({"estimator": "noisy_topk", "top_k": 1}),
          ({"estimator": "noisy_topk", "top_k": 1, "normalize": True})]
QUIET = [({"estimator": name, "top_k": 1, "normalize": True})
         for name in ("dense", "default_moe", "straight_through", "sparsemixer", "unweighted")] + [
         {"estimator": "topk", "top_k": 1}, {"estimator": "topk", "top_k": 2, "normalize": True},
         {"estimator": "gumbel", "top_k": 1}, {"estimator": "noisy_topk", "top_k": 2}]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("kwargs", WARNED, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_top1_constant_weight_warns_and_names_the_fixes(framework, kwargs):
    with pytest.warns(UserWarning, match="no task gradient") as caught:
        build(framework, losses={}, **kwargs)
    message = str(caught[0].message)
    for fix in _spec.FIXES_CONSTANT_WEIGHT:
        assert repr(fix) in message
    assert caught[0].filename == __file__  # points at the caller, not into moegrad


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("kwargs", QUIET, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_configurations_with_a_task_gradient_do_not_warn(framework, kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(framework, losses={}, **kwargs)
    assert not [w for w in caught if "no task gradient" in str(w.message)]


@pytest.mark.parametrize("kwargs", WARNED, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_the_warned_configurations_really_get_no_router_task_gradient(kwargs):
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        moe = moegrad.MoE(8, 16, 4, losses={}, **kwargs)
    with torch.no_grad():
        moe.router.gate.weight.normal_()
    out = moe(torch.randn(32, 8))
    out.y.square().sum().backward()
    # zero up to fp32 rounding of s / s (about 1e-8 here, against > 1e-3 for a fix below)
    assert moe.router.gate.weight.grad is None or moe.router.gate.weight.grad.abs().max() < 1e-6
    # and a fix named in the warning does give the router a task gradient here
    torch.manual_seed(0)
    fixed = moegrad.MoE(8, 16, 4, losses={}, **{**kwargs, "estimator": "dense"})
    with torch.no_grad():
        fixed.router.gate.weight.normal_()
    fixed(torch.randn(32, 8)).y.square().sum().backward()
    assert fixed.router.gate.weight.grad.abs().max() > 1e-3


def test_hf_patch_warns_for_a_top1_renormalised_model():
    transformers = pytest.importorskip("transformers")
    import moegrad.hf

    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
        num_experts_per_tok=1, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    model = transformers.Qwen3MoeForCausalLM(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moegrad.hf.patch(model, estimator="topk")
    told = [w for w in caught if "no task gradient" in str(w.message)]
    assert len(told) == 1  # once for the model (one block here), at the user's line
    assert "estimator='topk' with top_k=1" in str(told[0].message) and told[0].filename == __file__
    moegrad.hf.unpatch(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moegrad.hf.patch(model, estimator="dense")
    assert not [w for w in caught if "no task gradient" in str(w.message)]


# ----------------------------------------------------------------------------- item 10: generator
@pytest.mark.parametrize("estimator", ["gumbel", "noisy_topk", "sparsemixer"])
@pytest.mark.parametrize("generator", ["abc", 42, 1.5, torch.zeros(1)])
def test_generator_is_checked_when_the_estimator_is_built(estimator, generator):
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        moegrad.MoE(8, 16, 4, 2, estimator=estimator, generator=generator)


def test_a_real_generator_is_accepted_and_reproducible():
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        moe = moegrad.MoE(8, 16, 4, 2, estimator="gumbel",
                          generator=torch.Generator().manual_seed(3))
        x = torch.randn(16, 8)
        outs.append(moe(x).routing.indices)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("seed,error", [("abc", TypeError), (1.5, TypeError), (-1, ValueError)])
def test_mlx_seed_is_checked_when_the_estimator_is_built(seed, error):
    if mmlx is None:
        pytest.skip("mlx is not installed")
    with pytest.raises(error, match="seed"):
        mmlx.MoE(8, 16, 4, 2, estimator="gumbel", seed=seed)


# ----------------------------------------------------------------------------- item 12: names
def test_an_input_of_another_dtype_names_x():
    moe = moegrad.MoE(8, 16, 4, 2)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the layer's expert "
                                        r"weights have torch.float32"):
        moe(torch.randn(3, 8, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the input: allowed
        assert moe(torch.randn(3, 8)).y.shape == (3, 8)


def test_spec_rules():
    assert _spec.expert_capacity(1.25, 10, 2, 4) == 7  # ceil(1.25 * 20 / 4) = ceil(6.25)
    assert _spec.dense_chunk_tokens(None, 64, 128, 8) == (1 << 24) // (128 * 8)
    assert _spec.dense_chunk_tokens(5, 64, 128, 8) == 5
    assert _spec.dense_chunk_tokens(None, 1 << 20, 1, 1 << 10) == 1
    assert _spec.check_losses(None, "topk") == {}
    assert _spec.check_losses({"switch": 1}, "topk") == {"switch": 1.0}
