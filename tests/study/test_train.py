"""moegrad.study.train: settings, FLOPs and the time-limit flag of every run; pretraining."""

import math

import pytest
import torch

from moegrad.study.tasks import Clusters
from moegrad.study.train import END, pretrain, state_copy, train_run


def test_run_records_settings_flops_and_no_time_limit():
    task = Clusters(0, batch_size=64, val_size=256)
    run = train_run(task, "topk", 0, steps=6, time_budget=60, eval_every=2, diag_every=0,
                    losses={"switch": 0.01})
    assert run["settings"] == {"task": "clusters", "top_k": 1, "num_experts": 8,
                               "router_init": "zero", "lr": 0.003, "routing": "topk", "balancer": "none",
                               "num_classes": 4, "dim": 16, "regime": "scratch",
                               "losses": {"switch": 0.01}}
    assert run["time_limited"] is False and run["stopped_by"] == "steps"
    h = run["history"]
    # hand count per step (T = 64, D = 16, H = 32, E = 8, K = 1): experts 2 D H T (3 + 3 + 1),
    # router forward + weight gradient 2 * 2 T D E, combine weight gradient 2 T D
    per_step = 2 * 16 * 32 * 64 * 7 + 2 * 2 * 64 * 16 * 8 + 2 * 64 * 16
    assert run["flops_per_step"] == per_step
    assert h["eval_step"] == [0, 2, 4, 6]
    assert h["flops"] == [0, 2 * per_step, 4 * per_step, 6 * per_step]
    parts = run["flops_per_step_by_part"]
    assert parts["unselected"] == 0 and sum(parts.values()) == per_step


def test_dense_flops_exceed_topk_by_the_unselected_pairs():
    task = Clusters(0, batch_size=64, val_size=256)
    runs = {n: train_run(task, n, 0, steps=2, time_budget=60, eval_every=1, diag_every=0)
            for n in ("topk", "dense")}
    extra = 64 * (8 - 1) * 2 * 3 * 16 * 32  # T (E - K) pairs, 2 * 3 D H FLOPs each
    assert runs["dense"]["flops_per_step"] - runs["topk"]["flops_per_step"] == extra
    assert runs["dense"]["history"]["flops"][-1] - runs["topk"]["history"]["flops"][-1] == 2 * extra


def test_time_limited_run_is_flagged():
    task = Clusters(0, batch_size=64, val_size=256)
    run = train_run(task, "topk", 0, steps=50, time_budget=1e-9, eval_every=10, diag_every=0)
    assert run["steps"] == 1  # the first step passes any budget > 0
    assert run["time_limited"] is True and run["stopped_by"] == "time"
    assert run["history"]["eval_step"] == [0, 1]
    assert run["history"]["flops"][-1] == run["flops_per_step"] > 0


def test_checkpoints_are_state_copies_at_the_asked_steps():
    task = Clusters(0, batch_size=64, val_size=256)
    kept = []
    run = train_run(task, "dense", 0, steps=8, time_budget=60, eval_every=4, diag_every=0,
                    checkpoints=(0, 2, 4, END),
                    on_checkpoint=lambda step, model: kept.append((step, state_copy(model))))
    assert [s for s, _ in kept] == [0, 2, 4, 8]
    gates = [st["router.gate.weight"] for _, st in kept]
    assert float(gates[0].abs().sum()) == 0.0  # zero-initialised router
    assert all(float((a - b).abs().sum()) > 0 for a, b in zip(gates, gates[1:]))
    assert run["steps"] == 8


def test_regime_needs_its_init_state():
    task = Clusters(0, batch_size=64, val_size=256)
    with pytest.raises(ValueError, match="regime='finetune' needs init_state"):
        train_run(task, "topk", 0, steps=1, time_budget=60, eval_every=1, diag_every=0,
                  regime="finetune")
    with pytest.raises(ValueError, match="regime='pretrain' is not supported"):
        train_run(task, "topk", 0, steps=1, time_budget=60, eval_every=1, diag_every=0,
                  regime="pretrain")


def test_pretrain_returns_the_final_state_and_a_summary():
    task = Clusters(0, batch_size=64, val_size=256)
    state, info = pretrain(task, 0, steps=5, time_budget=60, eval_every=5)
    assert info["estimator"] == "topk" and info["losses"] == {"switch": 0.01}
    assert info["steps"] == 5 and info["time_limited"] is False
    assert math.isfinite(info["val_loss"]) and 0 <= info["purity"] <= 1
    assert float(state["router.gate.weight"].abs().sum()) > 0  # the switch loss moved it
    model = task.build("topk", {}, {}, 0)
    model.load_state_dict(state)
    assert task.evaluate(model)["val_loss"] == pytest.approx(info["val_loss"], rel=1e-6)


def _final_state(task, estimator, steps, **kw):
    keep = {}
    run = train_run(task, estimator, 0, steps=steps, time_budget=60, eval_every=1, diag_every=0,
                    checkpoints=(END,), on_checkpoint=lambda s, m: keep.update(state=state_copy(m)),
                    **kw)
    return run, keep["state"]


def test_bias_balancer_steps_after_every_optimizer_step():
    task = Clusters(0, batch_size=64, val_size=256)
    task.selection_bias, task.balancer = True, "bias"
    run, state = _final_state(task, "topk", 1)
    assert run["settings"]["balancer"] == "bias"
    # one BiasBalancer step (gamma 1e-3): b = gamma * sign(mean load - load) of step 1's load,
    # which the run's load window recorded at its step-1 evaluation
    load = torch.tensor(run["history"]["load"][1], dtype=torch.float64)
    expected = 1e-3 * torch.sign(load.mean() - load)
    assert torch.allclose(state["router.bias"].double(), expected, atol=1e-9)
    assert expected.abs().sum() > 0
    _, two = _final_state(task, "topk", 2)
    assert not torch.equal(two["router.bias"], state["router.bias"])


def test_quantile_balancer_moves_the_bias_and_none_keeps_no_bias():
    task = Clusters(0, batch_size=64, val_size=256)
    task.selection_bias, task.balancer = True, "quantile"
    run, state = _final_state(task, "dense", 2)
    assert run["settings"]["balancer"] == "quantile" and run["steps"] == 2
    assert state["router.bias"].abs().sum() > 0
    plain = Clusters(0, batch_size=64, val_size=256)
    _, state = _final_state(plain, "topk", 2)
    assert "router.bias" not in state


@pytest.mark.parametrize("routing, estimator", [("remoe", "remoe"), ("expert_choice", "topk")])
def test_pair_routing_runs_record_active_experts_from_chosen(routing, estimator):
    task = Clusters(0, batch_size=64, val_size=256, router_init="normal")
    task.routing = routing
    run, _ = _final_state(task, estimator, 2)
    h = run["history"]
    assert h["diag_step"] == [] and "n/a under routing=" in run["diagnostics"]
    model = task.build(estimator, {}, {}, 0)
    task.reset()
    out = model(task.batch(0)[0])  # step 1's routing of the same initial model and batch
    assert h["active"][1] == pytest.approx(float(out.routing.chosen.sum(1).double().mean()))
    if routing == "expert_choice":  # capacity T K / E per expert, every one full
        assert h["active"][1] == pytest.approx(1.0) and h["load"][1] == [1 / 8] * 8
