"""The MLX bench runner returns medians for a tiny config (numbers only; speed is not tested)."""

from __future__ import annotations

import json

import pytest

from tests.mlx import need  # noqa: E402

mx = need("mlx.core")

from moegrad.bench import mlx as bench  # noqa: E402
# torch single-threaded while MLX runs, as in every tests/mlx module (see its conftest)
from tests.mlx.conftest import _torch_single_thread  # noqa: E402,F401


def test_run_config_reports_positive_medians_and_consistent_ratios():
    res = bench.run_config(16, 32, 4, 2, 24, repeats=2, estimator="dense", warmup=0)
    for key in ("forward_ms", "fwd_bwd_ms", "ideal_forward_ms", "ideal_fwd_bwd_ms", "tokens_per_s"):
        assert res[key] > 0, key
    assert res["fwd_bwd_ratio"] == pytest.approx(res["fwd_bwd_ms"] / res["ideal_fwd_bwd_ms"])
    assert res["tokens_per_s"] == pytest.approx(24 / (res["fwd_bwd_ms"] / 1e3))
    assert (res["backend"], res["estimator"], res["experts"]) == ("mlx", "dense", 4)
    with pytest.raises(ValueError, match="top_k=5"):
        bench.run_config(16, 32, 4, 5, 24)


def test_cli_prints_json(capsys):
    assert bench.main(["--configs", "8,16,2,1,4", "--repeats", "1", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["dim"] == 8 and row["forward_ms"] > 0


def test_runner_speaks_the_torch_bench_protocol():
    """run_mlx(config, args, progress) -> rows with the keys moegrad.bench.cli.summarize reads."""
    from argparse import Namespace

    class Count:
        n = 0

        def update(self, k):
            self.n += k

    args = Namespace(estimators=["dense", "straight_through"], repeats=1, warmup=0,
                     no_forward=False, dtype="float32", seed=0)
    progress = Count()
    rows = bench.run_mlx((8, 16, 16, 2, 12), args, progress)
    names = [r["name"] for r in rows]
    assert names == ["dense_ideal", "mlx/gather_mm", "estimator/topk", "estimator/dense",
                     "estimator/straight_through", "router"]
    assert progress.n == len(rows)
    for r in rows:
        assert r["fwd_bwd_ms"] > 0 and r["fwd_ms"] > 0 and r["tokens_per_s"] > 0
        assert len(r["fwd_bwd_ms_all"]) == 1 and r["peak_mb"] >= 0 and r["saved_mb"] is None


def test_the_progress_bar_counts_every_mlx_case():
    from moegrad.bench.mlx import build_cases, case_count

    for estimators in (("topk",), ("topk", "dense", "default_moe"), ("dense",)):
        assert len(build_cases((8, 8, 4, 2, 16), estimators)) == case_count(estimators), estimators
