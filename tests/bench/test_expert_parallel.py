"""The expert-parallel benchmark: ``moegrad bench --world-size`` option mapping, tested with the
benchmark replaced by a stub, plus one tiny real bf16 run; the byte model and argument checks
of :mod:`moegrad.bench.expert_parallel`."""

from __future__ import annotations

import argparse
import json

import pytest

from moegrad import bench
from moegrad.bench import expert_parallel
from moegrad.bench.expert_parallel import bench_expert_parallel, format_table, model_bytes


def _bench_args(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(["--no-progress", *argv])


def _fake_rows(calls):
    def fake(world_sizes, **kwargs):
        calls.append((tuple(world_sizes), kwargs))
        return [{"world_size": w, "tokens_per_s": 1.0, "step_ms": 1.0, "bytes_per_step_per_rank": 0.0,
                 "model_bytes_per_step_per_rank": 0.0} for w in world_sizes]
    return fake


def test_bench_world_sizes_maps_the_bench_options(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(expert_parallel, "bench_expert_parallel", _fake_rows(calls))
    monkeypatch.chdir(tmp_path)
    args = _bench_args("--world-size", "1", "2", "--configs", "16,24,4,2,32", "8,8,2,1,10",
                       "--repeats", "3", "--warmup", "0", "--dtype", "bfloat16", "--seed", "5",
                       "--estimators", "gumbel", "--impls", "loop", "--threads", "2", "--json", "-")
    assert bench.run_world_sizes(args) == 0
    report = json.loads(capsys.readouterr().out)  # stdout holds only the JSON
    assert not (tmp_path / "-").exists()
    assert [c[0] for c in calls] == [(1, 2), (1, 2)]
    keys = ("dim", "hidden", "experts", "top_k", "tokens", "steps", "warmup", "dtype", "seed",
            "estimator", "impl", "threads")
    assert [tuple(kw[k] for k in keys) for _, kw in calls] == [
        (16, 24, 4, 2, 32, 3, 0, "bfloat16", 5, "gumbel", "loop", 2),
        (8, 8, 2, 1, 10, 3, 0, "bfloat16", 5, "gumbel", "loop", 2)]
    assert [r["config"]["tokens"] for r in report] == [32, 10]
    assert [[row["world_size"] for row in r["rows"]] for r in report] == [[1, 2], [1, 2]]
    # defaults: the distributed benchmark's shape, --repeats as steps, --quick caps them at 3
    calls.clear()
    path = tmp_path / "one.json"
    assert bench.run_world_sizes(_bench_args("--world-size", "2", "--quick", "--json", str(path))) == 0
    kw = calls[0][1]
    d = expert_parallel.DEFAULTS
    assert (kw["dim"], kw["hidden"], kw["experts"], kw["top_k"], kw["tokens"]) == (
        d["dim"], d["hidden"], d["experts"], d["top_k"], d["tokens"])
    assert (kw["steps"], kw["warmup"], kw["dtype"], kw["seed"], kw["impl"], kw["estimator"]) == (
        3, 1, "float32", 0, "auto", "topk")
    assert json.loads(path.read_text())["config"]["steps"] == 3
    assert "all-to-all bytes" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (("--backend", "mlx"), "--backend 'mlx' is not supported"),
    (("--impls", "loop,bmm"), "one expert backend per run"),
    (("--estimators", "topk,dense"), "one estimator per run"),
    (("--repeats", "0"), "--repeats=0"),
])
def test_bench_world_sizes_refuses_what_it_cannot_map(monkeypatch, argv, message):
    calls = []
    monkeypatch.setattr(expert_parallel, "bench_expert_parallel", _fake_rows(calls))
    with pytest.raises(ValueError, match=message):
        bench.run_world_sizes(_bench_args("--world-size", "1", *argv))
    assert calls == []


def test_bench_world_sizes_runs_bfloat16_and_prints_json(capsys):
    """A real 2-process run of a tiny config in bf16, JSON on stdout."""
    args = _bench_args("--world-size", "2", "--configs", "8,16,4,2,24", "--repeats", "1", "--warmup", "0",
                       "--dtype", "bfloat16", "--seed", "3", "--json", "-")
    assert bench.run_world_sizes(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["dtype"] == "bfloat16" and report["config"]["seed"] == 3
    (row,) = report["rows"]
    assert row["world_size"] == 2 and row["tokens_per_s"] > 0
    assert row["model_bytes_per_step_per_rank"] == 4 * 2 * 24 * 8 * 2 / 2  # b = 2 bytes
    # the mean over ranks of: one header of (3 + E/W) int64, then 4 exchanges of D bf16 values
    # per off-rank row (16 bytes); fp32 rows would double the model's value
    rows_bytes = row["bytes_per_step_per_rank"] - (3 + 2) * 8
    assert (2 * rows_bytes) % 16 == 0
    assert 0.5 * row["model_bytes_per_step_per_rank"] < rows_bytes < 1.5 * row["model_bytes_per_step_per_rank"]


def test_bench_model_and_validation():
    # 4 exchanges of K T rows of D fp32 values, (W - 1) / W of them off-rank
    assert model_bytes(512, 64, 2, 1) == 0
    assert model_bytes(512, 64, 2, 2) == 4 * 2 * 512 * 64 * 4 / 2
    assert model_bytes(100, 10, 1, 4, element_size=2) == 4 * 100 * 10 * 2 * 3 / 4
    with pytest.raises(ValueError, match="world_size=3 does not divide experts=8"):
        bench_expert_parallel((3,), experts=8, progress=False)
    with pytest.raises(ValueError, match="tokens=0"):
        bench_expert_parallel((1,), tokens=0, progress=False)
    with pytest.raises(ValueError, match="dtype='float16' is not supported"):
        bench_expert_parallel((1,), dtype="float16", progress=False)
    with pytest.raises(ValueError, match="impl='fast' is unknown"):
        bench_expert_parallel((1,), impl="fast", progress=False)
    table = format_table([{"world_size": 2, "tokens_per_s": 1000.0, "step_ms": 5.0,
                           "bytes_per_step_per_rank": 10.0, "model_bytes_per_step_per_rank": 12.0}],
                         dict(tokens=4, dim=2, hidden=3, experts=2, top_k=1, steps=1, estimator="topk"))
    assert "| 2 | 1000 | 5.0 | 10 | 12 |" in table
    assert "all-to-all bytes sent/step/rank" in table
