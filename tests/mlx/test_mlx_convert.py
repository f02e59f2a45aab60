"""from_torch / to_torch: configuration, weights and state survive the trip both ways; moegrad.mlx
itself needs no torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.mlx import need  # noqa: E402

mx = need("mlx.core")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import moegrad  # noqa: E402
from moegrad import mlx as mgx  # noqa: E402
from tests.mlx.mlx_helpers import max_diff, to_mx  # noqa: E402

CASES = [
    ("topk", dict(score="sigmoid", normalize=True, routed_scaling_factor=2.0, temperature=0.5)),
    ("unweighted", dict(activation="gelu", capacity_factor=1.5)),
    ("straight_through", dict(num_experts=8, n_group=4, topk_group=2, selection_bias=True)),
    ("dense", dict(chunk_tokens=7, losses={"z_loss": 1e-3})),
    ("default_moe", dict(beta=0.5, forward_defaults=True)),
    ("gumbel", dict(tau=0.3, hard=True)),
    ("noisy_topk", dict(noise_epsilon=0.2, losses={"importance_load": 1e-2})),
    ("sparsemixer", dict(jitter_eps=0.05)),
]


def filled(estimator, kwargs):
    """A torch MoE with every buffer non-trivial (trained a step, bias and w_noise set)."""
    tm = moegrad.MoE(8, 12, kwargs.pop("num_experts", 4), 2, estimator=estimator, **kwargs)
    with torch.no_grad():
        if tm.router.bias is not None:
            tm.router.bias.normal_()
        if hasattr(tm.router.estimator, "w_noise"):
            tm.router.estimator.w_noise.normal_()
    tm(torch.randn(30, 8))
    return tm


@pytest.mark.parametrize("estimator,kwargs", CASES, ids=[c[0] for c in CASES])
def test_round_trip_keeps_everything(estimator, kwargs):
    tm = filled(estimator, dict(kwargs))
    tm.eval()
    mm = mgx.from_torch(tm)
    assert not mm.training and mm.estimator.name == estimator
    assert mm.losses == tm.losses and mm.capacity_factor == tm.capacity_factor
    for key, value in kwargs.items():
        if key in type(tm.estimator).options:
            assert getattr(mm.estimator, key) == value
        elif hasattr(tm.router.config, key) and key != "capacity_factor":  # the layer's here
            assert getattr(mm.router.config, key) == value
    back = mgx.to_torch(mm)
    assert not back.training
    assert back.router.config == tm.router.config
    assert back.experts.activation == tm.experts.activation
    sd, sd_back = tm.state_dict(), back.state_dict()
    assert sorted(sd) == sorted(sd_back)
    for name, value in sd.items():
        assert sd_back[name].dtype == value.dtype, name
        assert torch.equal(sd_back[name], value), name
    assert int(tm.router.load_counts.sum()) == 60
    x = torch.randn(9, 8)
    assert max_diff(mm(to_mx(x)).y, tm(x).y) < 1e-5


def test_router_alone_and_training_mode():
    tr = moegrad.Router(8, 6, 3, estimator="dense", normalize=True, selection_bias=True)
    with torch.no_grad():
        tr.bias.normal_()
    mr = mgx.from_torch(tr)
    assert isinstance(mr, mgx.Router) and mr.training
    x = torch.randn(11, 8)
    rt, rm = tr(x), mr(to_mx(x))
    assert np.array_equal(np.array(rm.indices), rt.indices.numpy())
    assert max_diff(rm.weights, rt.weights) < 1e-6
    back = mgx.to_torch(mr)
    assert isinstance(back, moegrad.Router)
    assert torch.equal(back.bias, tr.bias) and torch.equal(back.load_counts, tr.load_counts)


def test_bfloat16_weights_keep_their_dtype():
    tm = moegrad.MoE(8, 12, 4, 2).to(torch.bfloat16)
    mm = mgx.from_torch(tm)
    assert mm.experts.w1.dtype == mx.bfloat16 and mm.router.gate.weight.dtype == mx.bfloat16
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    y = mm(to_mx(x.float()).astype(mx.bfloat16)).y
    assert y.dtype == mx.bfloat16
    assert max_diff(y, tm(x).y) < 3e-2
    back = mgx.to_torch(mm)
    assert back.experts.w1.dtype == torch.bfloat16 and back.router.gate.weight.dtype == torch.bfloat16
    assert torch.equal(back.experts.w1, tm.experts.w1)
    assert torch.equal(back.router.gate.weight, tm.router.gate.weight)


def test_float16_router_round_trip_keeps_its_dtype():
    tr = moegrad.Router(8, 4, 2).to(torch.float16)
    back = mgx.to_torch(mgx.from_torch(tr))
    assert back.gate.weight.dtype == torch.float16
    assert torch.equal(back.gate.weight, tr.gate.weight)


def test_wrong_types_are_refused():
    with pytest.raises(TypeError, match="moegrad.MoE or moegrad.Router"):
        mgx.from_torch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="moegrad.mlx.MoE or moegrad.mlx.Router"):
        mgx.to_torch(moegrad.MoE(8, 12, 4, 2))


def test_moegrad_mlx_imports_without_torch():
    """A plain ``import moegrad.mlx`` with torch (and numpy) blocked: the top-level package
    imports its PyTorch names lazily, so an MLX user never loads torch."""
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "numpy"):
                    raise ImportError(name + " is blocked")
        sys.meta_path.insert(0, Block())
        import mlx.core as mx
        import moegrad.mlx as mgx
        moe = mgx.MoE(8, 12, 4, 2, estimator="dense")
        out = moe(mx.ones((3, 8)))
        print(out.y.shape, "torch" in sys.modules, "numpy" in sys.modules)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["(3,", "8)", "False", "False"]


def test_torch_names_load_on_first_use():
    code = ("import sys, moegrad; a = 'torch' in sys.modules; moegrad.MoE; "
            "print(a, 'torch' in sys.modules, moegrad.estimators.available()[0], "
            "sorted(moegrad.__all__) == sorted(n for n in moegrad.__all__ if hasattr(moegrad, n)))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "True", "default_moe", "True"]


def test_expert_choice_router_and_layer_round_trip_with_their_capacity_factor():
    tr = moegrad.Router(8, 4, 2, routing="expert_choice", capacity_factor=1.5)
    mr = mgx.from_torch(tr)
    assert mr.config.routing == "expert_choice" and mr.config.capacity_factor == 1.5
    assert mgx.to_torch(mr).config.capacity_factor == 1.5
    tm = moegrad.MoE(8, 12, 4, 2, routing="expert_choice", capacity_factor=0.5)
    back = mgx.to_torch(mgx.from_torch(tm))
    assert back.router.config.capacity_factor == 0.5 == back.capacity_factor and back.losses == {}
