"""`moegrad bench` on a tiny config: JSON fields, ratios from the same run, argument errors."""

from __future__ import annotations

import json
import statistics

import pytest

from moegrad.cli import main


def test_bench_cli_tiny(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = main(["bench", "--configs", "32,64,4,2,48", "--impls", "auto,loop,bmm",
               "--estimators", "dense", "--repeats", "2", "--warmup", "0", "--no-compile",
               "--no-progress", "--json", str(path)])
    assert rc == 0
    assert "dense_ideal" in capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["backend"] == "torch" and report["repeats"] == 2
    (cfg,) = report["configs"]
    assert cfg["config"] == {"d": 32, "f": 64, "E": 4, "k": 2, "T": 48}
    rows = {r["name"]: r for r in cfg["results"]}
    expected = {"dense_ideal", "moegrad/auto", "moegrad/loop", "moegrad/bmm", "estimator/topk",
                "estimator/dense", "router"}
    if report["transformers"] is not None:
        expected |= {"hf/eager", "hf/grouped_mm"}
    assert set(rows) == expected
    dense = rows["dense_ideal"]
    for r in rows.values():
        assert len(r["fwd_bwd_ms_all"]) == 2 and len(r["fwd_ms_all"]) == 2
        assert r["fwd_bwd_ms"] == pytest.approx(statistics.median(r["fwd_bwd_ms_all"]))
        # ratios are taken against the dense ideal of this same run
        assert r["ratio_fwd_bwd"] == pytest.approx(r["fwd_bwd_ms"] / dense["fwd_bwd_ms"])
        assert r["ratio_fwd"] == pytest.approx(r["fwd_ms"] / dense["fwd_ms"])
        assert r["tokens_per_s"] == pytest.approx(48 / (r["fwd_bwd_ms"] / 1e3))
        assert r["saved_mb"] >= 0
        assert r["peak_mb"] >= r["saved_mb"] or r["name"] == "router"
    assert rows["moegrad/auto"]["saved_mb"] > 0 and dense["saved_mb"] > 0
    assert cfg["estimator_overhead"]["topk"] == 1.0
    assert cfg["estimator_overhead"]["dense"] == pytest.approx(
        rows["estimator/dense"]["fwd_bwd_ms"] / rows["estimator/topk"]["fwd_bwd_ms"])
    assert cfg["router_share"] == pytest.approx(rows["router"]["fwd_bwd_ms"] / rows["estimator/topk"]["fwd_bwd_ms"])
    if "hf/grouped_mm" in rows:
        assert cfg["speedup_vs_hf_grouped_mm"] == pytest.approx(
            rows["hf/grouped_mm"]["fwd_bwd_ms"] / rows["moegrad/auto"]["fwd_bwd_ms"])


def test_peak_bytes_sees_transient_buffers():
    import torch

    from moegrad.bench import peak_bytes

    def step():
        a = torch.ones(1024, 1024)  # 4 MiB, freed before b is made
        del a
        b = torch.ones(512, 1024)  # 2 MiB
        c = torch.ones(512, 1024)  # 2 MiB more while b lives
        del b, c

    assert peak_bytes(step) == 4 * 2 ** 20


def test_saved_bytes_counts_activations_once():
    import torch

    from moegrad.bench import saved_bytes
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    # x @ w saves x (128 B; w excluded); sin saves its input h (128 B); h used twice counts once
    def step():
        h = x @ w
        return h.sin() + h.cos()
    assert saved_bytes(step, {w.untyped_storage().data_ptr()}) == 4 * 8 * 4 * 2


@pytest.mark.parametrize("argv,message", [
    (["--configs", "32,64,4,5,48"], "k <= E"),
    (["--impls", "fast"], "comma-separated subset"),
    (["--backend", "jax"], "invalid choice"),
])
def test_bench_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench"] + argv)
    assert message in capsys.readouterr().err


def test_bench_mlx_backend_tiny(tmp_path):
    pytest.importorskip("mlx.core", reason="MLX is not installed")
    path = tmp_path / "mlx.json"
    rc = main(["bench", "--backend", "mlx", "--configs", "16,32,4,2,24", "--estimators", "topk",
               "--repeats", "2", "--warmup", "0", "--no-progress", "--json", str(path)])
    assert rc == 0
    report = json.loads(path.read_text())
    assert report["backend"] == "mlx"
    rows = {r["name"]: r for r in report["configs"][0]["results"]}
    assert {"dense_ideal", "estimator/topk"} <= set(rows)
    for r in rows.values():
        assert r["fwd_bwd_ms"] > 0
        assert r["ratio_fwd_bwd"] == pytest.approx(r["fwd_bwd_ms"] / rows["dense_ideal"]["fwd_bwd_ms"])


def test_bench_world_sizes_reports_bytes_exchanged(tmp_path, capsys):
    path = tmp_path / "ep.json"
    rc = main(["bench", "--world-size", "1", "2", "--estimators", "topk", "--no-progress",
               "--json", str(path)])
    assert rc == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["world_size"] for r in rows] == [1, 2]
    assert rows[0]["bytes_per_step_per_rank"] == 0
    # measured bytes follow the model 4*K*T*D*b*(W-1)/W within the routing imbalance
    assert rows[1]["bytes_per_step_per_rank"] == pytest.approx(rows[1]["model_bytes_per_step_per_rank"], rel=0.2)
    assert "tokens/s" in capsys.readouterr().out


def test_bench_world_sizes_refuses_several_estimators():
    with pytest.raises(ValueError, match="one estimator per run"):
        main(["bench", "--world-size", "1", "--estimators", "topk,dense", "--no-progress"])
