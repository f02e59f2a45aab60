"""`moegrad bench` on a tiny config: JSON fields, ratios from the same run, argument errors."""

from __future__ import annotations

import json
import statistics

import pytest

from moegrad.bench.cli import format_table, summarize
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
                "estimator/dense", "routing/sinkhorn", "routing/expert_choice", "routing/remoe",
                "balancing/quantile", "router"}
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


def _row(name: str, fwd_bwd_ms: float) -> dict:
    return {"name": name, "kind": "estimator", "fwd_bwd_ms": fwd_bwd_ms, "fwd_ms": None,
            "tokens_per_s": 1e3, "saved_mb": 1.0, "peak_mb": None}


def test_table_columns_fit_long_case_names():
    header = (f"  {'case':24s} {'fwd+bwd ms':>11s} {'x dense':>8s} {'fwd ms':>9s} {'x dense':>8s} "
              f"{'tok/s':>9s} {'saved MB':>9s} {'peak MB':>9s}")
    short = format_table(summarize((8, 16, 4, 2, 12), [_row("dense_ideal", 1.0)])).splitlines()
    assert short[1] == header  # names that fit keep the 24-character column
    assert len(short[2]) == len(header)
    summary = summarize((8, 16, 4, 2, 12), [_row("dense_ideal", 1.0),
                                            _row("estimator/straight_through", 123456789.5)])
    lines = format_table(summary).splitlines()[1:4]
    assert len({len(line) for line in lines}) == 1
    assert lines[2].startswith("  estimator/straight_through ")
    # the fwd+bwd column's right edge is the same in the header and both rows
    ends = {lines[0].index("fwd+bwd ms") + 10, lines[1].index(" 1.0 ") + 4,
            lines[2].index("123456789.5") + 11}
    assert len(ends) == 1


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
