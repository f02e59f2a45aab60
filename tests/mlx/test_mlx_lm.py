"""moegrad.mlx.lm: patching mlx-lm's Mixtral / Qwen3-MoE blocks (tiny random configs, no download).
Same forward as stock; with top-1 the stock router gets no gradient and dense fixes it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.mlx import need  # noqa: E402

mx = need("mlx.core")
need("mlx_lm")

import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from moegrad.mlx import lm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from mlx_router import tiny_model, train_routers  # noqa: E402

TOKENS = mx.random.randint(0, 64, (4, 17), key=mx.random.key(1))


def gate_grads(model):
    def loss_fn(m):
        return nn.losses.cross_entropy(m(TOKENS[:, :-1]), TOKENS[:, 1:], reduction="mean")

    _, grads = nn.value_and_grad(model, loss_fn)(model)
    return {k: v for k, v in tree_flatten(grads) if k.endswith("gate.weight")}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_patch_keeps_the_forward_and_unpatch_restores(family, top_k):
    model = tiny_model(family, top_k)
    ref = model(TOKENS)
    assert lm.patch(model, estimator="dense") == 2
    blocks = [b for _, b in model.named_modules() if isinstance(b, lm.MoEBlock)]
    assert len(blocks) == 2 and blocks[0].family == family
    assert float(mx.abs(model(TOKENS) - ref).max()) < 1e-5
    names = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert any(k.endswith("gate.weight") for k in names) and any("switch_mlp" in k for k in names)
    assert lm.unpatch(model) == 2
    assert not any(isinstance(b, lm.MoEBlock) for _, b in model.named_modules())
    assert float(mx.abs(model(TOKENS) - ref).max()) == 0.0


def test_top1_stock_router_gets_nothing_dense_gets_the_gradient():
    stock = tiny_model("mixtral", 1)
    g_stock = gate_grads(stock)
    assert len(g_stock) == 2
    assert all(float(mx.abs(g).max()) == 0.0 for g in g_stock.values())
    patched = tiny_model("mixtral", 1)
    lm.patch(patched, estimator="topk")  # moegrad's topk reproduces the failure
    assert all(float(mx.abs(g).max()) < 1e-7 for g in gate_grads(patched).values())
    lm.patch(patched, estimator="dense")
    assert all(float(mx.abs(g).max()) > 1e-4 for g in gate_grads(patched).values())


def test_router_only_training_learns_with_dense_only():
    stock = tiny_model("mixtral", 1)
    before = {k: np.array(v) for k, v in tree_flatten(stock.parameters()) if k.endswith("gate.weight")}
    losses_stock = train_routers(stock, TOKENS, steps=12)
    after = {k: np.array(v) for k, v in tree_flatten(stock.parameters()) if k.endswith("gate.weight")}
    assert all(np.array_equal(before[k], after[k]) for k in before)  # the routers never moved
    assert losses_stock[-1] == pytest.approx(losses_stock[0], abs=1e-6)
    patched = tiny_model("mixtral", 1)
    lm.patch(patched, estimator="dense")
    losses_dense = train_routers(patched, TOKENS, steps=12)
    assert losses_dense[0] == pytest.approx(losses_stock[0], abs=1e-5)
    assert losses_dense[-1] < losses_dense[0] - 0.05


def test_default_moe_and_balance_losses_in_a_patched_model():
    model = tiny_model("qwen3_moe", 2)
    lm.patch(model, estimator="default_moe", losses={"switch": 1e-2, "z_loss": 1e-3})
    model(TOKENS)
    aux = lm.aux_loss(model)
    assert float(aux) > 0
    block = model.model.layers[0].mlp
    assert float(mx.abs(block.estimator.defaults).sum()) > 0  # the EMA saw the experts' outputs
    with pytest.raises(ValueError, match="no supported MoE block"):
        lm.patch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="cannot patch"):
        lm.MoEBlock(nn.Linear(2, 2))
