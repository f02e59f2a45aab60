"""moegrad.hf.RoutingCallback: a Trainer run's logged routing health against the routings of
the same batches, recorded by the test and recomputed by hand."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import transformers

import moegrad.hf as mh
from tests.hf.models import tiny


class Dataset(torch.utils.data.Dataset):
    def __init__(self, n=6, seq=7):
        g = torch.Generator().manual_seed(3)
        self.rows = torch.randint(2, 64, (n, seq), generator=g)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def by_hand(routings: list, num_experts: int) -> dict:
    """The metrics of one block's routings (one per forward) from indices, scores and logits."""
    counts = [0] * num_experts
    h, tokens, switch, z = 0.0, 0, 0.0, 0.0
    for r in routings:
        idx, s, logits = r["indices"], r["scores"].double(), r["logits"].double()
        t = idx.shape[0]
        for i in idx.reshape(-1).tolist():
            counts[i] += 1
        for row in s.tolist():
            h += -sum(p * math.log(p) for p in row if p > 0) / math.log(num_experts)
        tokens += t
        f = [sum(1 for i in idx.reshape(-1).tolist() if i == e) / t for e in range(num_experts)]
        switch += num_experts * sum(f[e] * float(s[:, e].mean()) for e in range(num_experts))
        z += float((torch.logsumexp(logits, -1) ** 2).mean())
    mean = sum(counts) / num_experts
    n = len(routings)
    return {"load_cv": statistics.pstdev(counts) / mean, "max_violation": max(counts) / mean - 1,
            "dead_experts": float(sum(c == 0 for c in counts)), "entropy": h / tokens, "dropped": 0.0,
            "loss/switch": switch / n, "loss/z_loss": z / n}


@pytest.mark.parametrize("attach", [True, False])
def test_trainer_logs_the_routing_of_its_own_batches(tmp_path, attach):
    model = tiny("qwen3_moe")
    mh.patch(model, "topk", losses={"switch": 1e-2, "z_loss": 1e-3})
    blocks = {name: m for name, m in model.named_modules() if hasattr(m, "moegrad_router")}
    recorded = {name: [] for name in blocks}  # per block: one routing per training forward
    for name, block in blocks.items():
        block.moegrad_router.register_forward_hook(
            lambda mod, args, r, name=name: recorded[name].append(
                {"indices": r.indices.clone(), "scores": r.scores.detach().clone(),
                 "logits": r.logits.detach().clone()}))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, logging_steps=1, per_device_train_batch_size=2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    callback = mh.RoutingCallback(model)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Dataset(),
                                   callbacks=None if attach else [callback])
    if attach:
        callback.attach(trainer)
        assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    e = model.config.num_experts
    for step, entry in enumerate(logs):
        keys = {k for k in entry if k.startswith("moe/")}
        assert keys == {f"moe/{name}/{m}" for name in blocks for m in by_hand(recorded[name][:1], e)}
        for name in blocks:
            assert len(recorded[name]) == 3  # one forward per step: nothing extra
            for metric, want in by_hand(recorded[name][step:step + 1], e).items():
                assert entry[f"moe/{name}/{metric}"] == pytest.approx(want, rel=1e-5, abs=1e-7), (step, metric)
    callback.monitor.remove()


def test_the_trainer_model_is_taken_when_attached_and_kept_after_training(tmp_path):
    model = tiny("qwen3_moe")
    mh.patch(model, "topk", losses={"switch": 1e-2})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, logging_steps=2, per_device_train_batch_size=3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    callback = mh.RoutingCallback()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Dataset())
    callback.attach(trainer)
    trainer.train()
    (entry,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert entry["step"] == 2 and "moe/model.layers.0.mlp/load_cv" in entry
    assert entry["moe/model.layers.1.mlp/loss/switch"] > 0
    assert callback.monitor is not None  # trainer.evaluate() afterwards is logged too
    callback.monitor.remove()
    assert not any(b._forward_hooks for b in model.modules() if hasattr(b, "moegrad_router"))
    with pytest.raises(TypeError, match="transformers.Trainer"):
        callback.attach(object())
    with pytest.raises(TypeError, match="nn.Module"):
        mh.RoutingCallback("model")


@pytest.mark.slow
def test_finetune_example_trainer_mode_logs_the_routing(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "finetune_hf.py"
    spec = importlib.util.spec_from_file_location("finetune_hf", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "curves.png"
    common = ["--steps", "2", "--estimators", "dense", "--dim", "32", "--hidden", "32", "--seq", "16",
              "--batch", "2", "--layers", "1", "--eval-batches", "1", "--log-every", "1", "--quiet"]
    for mode in (["--trainer"], []):
        (r,) = module.main(common + mode + ["--out", str(out)]).values()
        assert len(r["losses"]) == 2 and all(3.0 < v < 7.0 for v in r["losses"])
        assert len(r["routing"]) == 2
        for read in r["routing"]:
            assert 0 <= read["moe/model.layers.0.mlp/load_cv"] and 0 < read["moe/model.layers.0.mlp/entropy"] <= 1
        assert out.stat().st_size > 1000


def test_report_to_tensorboard_gets_the_values_when_attached(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    results = {}
    for attach in (True, False):
        model = tiny("qwen3_moe")
        mh.patch(model, "topk", losses={"switch": 1e-2})
        out = tmp_path / str(attach)
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=2, logging_steps=1, per_device_train_batch_size=2,
            report_to=["tensorboard"], save_strategy="no", use_cpu=True, disable_tqdm=True)
        callback = mh.RoutingCallback(model)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Dataset(),
                                       callbacks=None if attach else [callback])
        if attach:
            callback.attach(trainer)
            trainer.train()
        else:
            with pytest.warns(UserWarning, match="attach"):
                trainer.train()
        (run,) = [p.parent for p in out.rglob("events.out.tfevents.*")]
        events = EventAccumulator(str(run))
        events.Reload()
        history = [e for e in trainer.state.log_history if "loss" in e]
        key = "moe/model.layers.0.mlp/load_cv"
        results[attach] = events.Tags()["scalars"]
        if attach:
            assert [(e.step, e.value) for e in events.Scalars("train/" + key)] == [
                (h["step"], pytest.approx(h[key], rel=1e-6)) for h in history]
    assert "train/moe/model.layers.0.mlp/load_cv" in results[True]
    assert not any("moe/" in tag for tag in results[False])  # it ran after the TensorBoard callback


@pytest.mark.parametrize("logging_steps,eval_steps", [(2, 2), (2, 1)])
def test_an_evaluation_log_gets_the_evaluation_forwards(tmp_path, logging_steps, eval_steps):
    """Each log reads its own kind of forwards: a training log the training forwards since the
    previous training log, an evaluation log that evaluation's forwards, however the two
    schedules interleave; trainer.evaluate() after train() is logged too."""
    model = tiny("qwen3_moe")
    mh.patch(model, "topk", losses={"switch": 1e-2, "z_loss": 1e-3})
    router = model.model.layers[1].mlp.moegrad_router
    recorded = {True: [], False: []}  # training mode -> routings
    router.register_forward_hook(lambda mod, args, r: recorded[mod.training].append(
        {"indices": r.indices.clone(), "scores": r.scores.detach().clone(), "logits": r.logits.detach().clone()}))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, logging_steps=logging_steps, per_device_train_batch_size=2,
        per_device_eval_batch_size=2, eval_strategy="steps", eval_steps=eval_steps, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Dataset(), eval_dataset=Dataset(n=4))
    mh.RoutingCallback().attach(trainer)
    trainer.train()
    trainer.evaluate()
    (train,) = [e for e in trainer.state.log_history if "loss" in e]
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    runs = 2 // eval_steps + 1  # during training, then evaluate()
    assert len(evaluations) == runs
    assert len(recorded[True]) == 2 and len(recorded[False]) == 2 * runs  # 4 eval rows in batches of 2
    e = model.config.num_experts
    for metric, want in by_hand(recorded[True], e).items():
        assert train[f"moe/model.layers.1.mlp/{metric}"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    for i, evaluation in enumerate(evaluations):
        for metric, want in by_hand(recorded[False][2 * i:2 * i + 2], e).items():
            assert evaluation[f"eval_moe/model.layers.1.mlp/{metric}"] == pytest.approx(want, rel=1e-5, abs=1e-7)
        assert not any(k.startswith("moe/") for k in evaluation)


def test_a_prefixed_evaluation_and_predict_keep_their_forwards_apart(tmp_path):
    """evaluate(metric_key_prefix="test") logs its forwards under test_moe/...; predict() logs
    nothing, and neither's forwards reach the next evaluate()'s log."""
    model = tiny("qwen3_moe")
    mh.patch(model, "topk", losses={"switch": 1e-2})
    router = model.model.layers[1].mlp.moegrad_router
    recorded = []
    router.register_forward_hook(lambda mod, args, r: recorded.append(
        {"indices": r.indices.clone(), "scores": r.scores.detach().clone(), "logits": r.logits.detach().clone()}))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args)
    mh.RoutingCallback().attach(trainer)
    e = model.config.num_experts
    key = "model.layers.1.mlp/load_cv"
    trainer.compute_metrics = lambda prediction: {"decode_runtime": 1.0}  # a metric ending in _runtime
    test = trainer.evaluate(Dataset(n=4), metric_key_prefix="test")  # 2 forwards
    logged = trainer.state.log_history[-1]
    assert test["test_loss"] == logged["test_loss"]
    assert logged[f"test_moe/{key}"] == pytest.approx(by_hand(recorded[:2], e)["load_cv"], rel=1e-5)
    assert not any(k.startswith(("eval_moe/", "moe/")) for k in logged)
    trainer.predict(Dataset(n=2))  # 1 forward, not logged
    assert len(recorded) == 3 and len(trainer.state.log_history) == 1
    trainer.evaluate(Dataset(n=2, seq=5))  # 1 forward: its own only
    want = by_hand(recorded[3:], e)
    assert len(recorded) == 4
    assert trainer.state.log_history[-1][f"eval_moe/{key}"] == pytest.approx(want["load_cv"], rel=1e-5, abs=1e-7)
    assert trainer.state.log_history[-1][f"eval_moe/{key.replace('load_cv', 'entropy')}"] == pytest.approx(
        want["entropy"], rel=1e-5)
