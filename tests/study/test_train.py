"""moegrad.study.train: settings, FLOPs and the time-limit flag of every run; pretraining."""

import math

import pytest

from moegrad.study.tasks import Clusters
from moegrad.study.train import END, pretrain, state_copy, train_run


def test_run_records_settings_flops_and_no_time_limit():
    task = Clusters(0, batch_size=64, val_size=256)
    run = train_run(task, "topk", 0, steps=6, time_budget=60, eval_every=2, diag_every=0,
                    losses={"switch": 0.01})
    assert run["settings"] == {"task": "clusters", "top_k": 1, "num_experts": 8,
                               "router_init": "zero", "lr": 0.003, "routing": "topk",
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
