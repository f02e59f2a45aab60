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
    assert rows["moegrad/auto"]["saved_mb"] > 0 and dense["saved_mb"] > 0
    assert cfg["estimator_overhead"]["topk"] == 1.0
    assert cfg["estimator_overhead"]["dense"] == pytest.approx(
        rows["estimator/dense"]["fwd_bwd_ms"] / rows["estimator/topk"]["fwd_bwd_ms"])
    assert cfg["router_share"] == pytest.approx(rows["router"]["fwd_bwd_ms"] / rows["estimator/topk"]["fwd_bwd_ms"])
    if "hf/grouped_mm" in rows:
        assert cfg["speedup_vs_hf_grouped_mm"] == pytest.approx(
            rows["hf/grouped_mm"]["fwd_bwd_ms"] / rows["moegrad/auto"]["fwd_bwd_ms"])


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
    (["--backend", "mlx"], "invalid choice"),
])
def test_bench_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench"] + argv)
    assert message in capsys.readouterr().err
