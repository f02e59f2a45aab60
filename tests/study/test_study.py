"""moegrad study: the tasks, one training run, and the CLI end to end on a reduced budget."""

import json
import math

import pytest
import torch

from moegrad import estimators
from moegrad.cli import build_parser, main
from moegrad.study.conclusions import conclusions
from moegrad.study.metrics import FIELDS, aggregate
from moegrad.study.report import write_report
from moegrad.study.tasks import Clusters, get_task
from moegrad.study.train import train_run


def test_clusters_task_data_and_truth():
    task = Clusters(0)
    again = Clusters(0)
    assert torch.equal(task.val[0], again.val[0]) and torch.equal(task.val_target, again.val_target)
    x, c, target = task.batch(0)
    assert x.shape == (256, 16) and target.shape == (256, 16) and int(c.max()) < 4
    assert task.val_target.pow(2).mean().item() == pytest.approx(1.0, rel=0.1)  # unit mean square
    # the teacher of a token's own class explains it: the nearest centre is its class
    nearest = torch.cdist(x, task.centres).argmin(1)
    assert (nearest == c).float().mean() > 0.99
    model = task.build("dense", {}, {}, seed=0)
    metrics = task.evaluate(model)  # zero-initialised router: every token to one expert
    assert metrics["purity"] == pytest.approx(max(torch.bincount(task.val[1]).tolist()) / len(task.val[1]))
    assert metrics["val_loss"] > 0.5
    with pytest.raises(ValueError, match="num_experts"):
        Clusters(0, num_classes=4, num_experts=3)
    with pytest.raises(ValueError, match="task"):
        get_task("mnist")


def test_charlm_task_runs_and_reports_bits_per_char():
    task = get_task("charlm")(0, dim=16, heads=2, layers=1, context=16, num_experts=4,
                              hidden_dim=16, batch_size=4, val_batches=2)
    run = train_run(task, "dense", 0, steps=3, time_budget=60, eval_every=3, diag_every=2)
    h = run["history"]
    assert run["steps"] == 3 and h["eval_step"] == [0, 3]
    assert h["val_loss"][0] == pytest.approx(math.log(task.vocab), rel=0.05)  # untrained: uniform
    assert h["bits_per_char"][-1] == pytest.approx(h["val_loss"][-1] / math.log(2))
    assert h["cos_exact"] == []  # no enumerable exact gradient through attention
    assert len(h["load"][-1]) == 4 and sum(h["load"][-1]) == pytest.approx(1.0)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = capsys.readouterr().out
    for option in ("--task", "--estimators", "--quick", "--steps", "--seeds", "--time-budget",
                   "--losses", "--eval-every", "--diag-every", "--diag-samples", "--tau", "--out",
                   "--no-progress", "--impl", "metrics.json"):
        assert option in text
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["study", "--estimators", "topk,bogus"])
    with pytest.raises(SystemExit):
        parser.parse_args(["study", "--losses", "switch"])
    args = parser.parse_args(["study", "--losses", "switch=0.01,z_loss=0.001"])
    assert args.losses == {"switch": 0.01, "z_loss": 0.001}
    assert parser.parse_args(["study"]).estimators is None  # None = all of available()
    assert len(estimators.available()) == 8


@pytest.mark.parametrize("argv, message", [
    (["--tau", "0"], "argument --tau: expected a finite number > 0, got 0"),
    (["--tau", "inf"], "argument --tau: expected a finite number > 0, got inf"),
    (["--time-budget", "-5"], "argument --time-budget: expected a finite number > 0, got -5"),
    (["--time-budget", "soon"], "argument --time-budget: expected a number > 0, got 'soon'"),
    (["--diag-every", "-1"], "argument --diag-every: expected an integer >= 0, got -1"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
])
def test_cli_refuses_bad_numbers_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["study", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    args = build_parser().parse_args(["study", "--tau", "0.5", "--time-budget", "30",
                                      "--diag-every", "0"])
    assert (args.tau, args.time_budget, args.diag_every) == (0.5, 30.0, 0)


def test_train_run_records_per_sample_cosines_and_the_reference():
    """Sampling estimators: cos_exact_sample (mean cosine of single samples, what a training
    step uses) differs from cos_exact (cosine of the mean of diag_samples samples); for a
    deterministic estimator they are equal."""
    task = Clusters(0, batch_size=64, val_size=256)
    runs = {name: train_run(task, name, 0, steps=4, time_budget=60, eval_every=2, diag_every=2,
                            diag_samples=4)
            for name in ("topk", "straight_through", "gumbel")}
    for name, run in runs.items():
        h = run["history"]
        assert h["diag_step"] == [0, 2, 4] and len(h["cos_exact_sample"]) == 3, name
    topk, gumbel = runs["topk"]["history"], runs["gumbel"]["history"]
    assert topk["cos_exact_sample"] == pytest.approx(topk["cos_exact"], abs=1e-12)
    assert max(topk["cos_exact"]) > 0.1
    assert all(s < m - 0.02 for s, m in zip(gumbel["cos_exact_sample"], gumbel["cos_exact"]))
    assert runs["topk"]["reference"] == "softmax weights"
    assert runs["gumbel"]["reference"] == "softmax weights"
    assert runs["straight_through"]["reference"] == "unit weights"
    doc = aggregate(list(runs.values()), task, {"seeds": 1, "diag_samples": 4})
    g = doc["estimators"]["gumbel"]
    # step 0 apart: the mean is over the diagnostics after step 0 (steps 2 and 4)
    assert g["cos_exact_sample"]["mean"] == pytest.approx(sum(gumbel["cos_exact_sample"][1:]) / 2)
    assert g["cos_exact_initial"]["mean"] == pytest.approx(gumbel["cos_exact"][0])
    assert g["sampling"] and not doc["estimators"]["topk"]["sampling"]
    assert doc["estimators"]["straight_through"]["reference"] == "unit weights"


def _stat(v):
    return {"mean": v, "std": 0.0, "values": [v]}


def test_most_faithful_conclusion_uses_the_per_sample_cosine(tmp_path):
    """A sampling estimator whose mean of 8 samples looks best (0.60) but whose single samples
    do not (0.20): the report shows both figures. Cosines measured on each estimator's own
    trajectory name no "most faithful" estimator (issue 12: they are not comparable)."""
    per = {}
    rows = (("gumbel", 0.60, 0.20, True, "softmax weights"),
            ("dense", 0.45, 0.45, False, "softmax weights"),
            ("straight_through", 0.30, 0.30, False, "unit weights"))
    for name, mean_cos, sample_cos, sampling, ref in rows:
        per[name] = {k: _stat(None) for k in FIELDS}
        per[name].update(final_loss=_stat(0.1), bits_per_char=_stat(None), cos_exact=_stat(mean_cos),
                         cos_exact_sample=_stat(sample_cos), cos_dense=_stat(0.3),
                         ms_per_step=_stat(1.0), reference=ref, sampling=sampling)
    doc = {"task": "clusters", "task_config": {}, "equal_time_seconds": 1.0, "target_loss": 0.1,
           "chance_purity": None, "estimators": per,
           "args": {"seeds": 2, "diag_samples": 8, "steps": 10, "time_budget": 60.0,
                    "losses": {}, "tau": 1.0}}
    text = " ".join(conclusions(doc))
    assert "Most faithful" not in text and "own training trajectory" in text
    assert "`gumbel` 0.20 vs 0.60" in text
    write_report(doc, tmp_path, "moegrad study")
    report = (tmp_path / "report.md").read_text()
    assert "cos exact (one sample) | cos exact (mean of 8 samples) | cos dense" in report
    assert "| 0.20 | 0.60 | 0.30 |" in report and "| unit weights |" in report
    assert "each estimator's own trajectory" in report


@pytest.mark.slow
def test_study_quick_tells_estimators_apart(tmp_path):
    out = tmp_path / "study"
    code = main(["study", "--quick", "--estimators", "dense,unweighted", "--steps", "200",
                 "--seeds", "1", "--eval-every", "100", "--diag-every", "100",
                 "--time-budget", "600", "--no-progress", "--out", str(out)])
    assert code == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["task"] == "clusters" and doc["chance_purity"] == 0.25
    for name in ("dense", "unweighted"):
        m = doc["estimators"][name]
        for field in FIELDS:
            assert field in m and "mean" in m[field], (name, field)
        assert m["steps"]["mean"] == 200
        assert m["ms_per_step"]["mean"] > 0
    dense, unweighted = doc["estimators"]["dense"], doc["estimators"]["unweighted"]
    assert dense["purity"]["mean"] >= 0.9
    assert unweighted["purity"]["mean"] <= 0.25 + 0.1
    assert dense["cos_exact"]["mean"] > 0.1 and unweighted["cos_exact"]["mean"] == 0.0
    assert dense["cos_exact_sample"]["mean"] == pytest.approx(dense["cos_exact"]["mean"], abs=1e-12)
    assert (dense["reference"], unweighted["reference"]) == ("softmax weights", "unit weights")
    assert dense["final_loss"]["mean"] < unweighted["final_loss"]["mean"]
    report = (out / "report.md").read_text()
    assert "| `dense` |" in report and "## Verdicts" in report and "Purity >= 0.9" in report
    assert "1 seed: too few for a paired test" in report  # one seed: means only, no verdict
    for png in ("loss_vs_step.png", "loss_vs_time.png", "load.png", "grad_cosine.png", "purity.png"):
        assert (out / png).stat().st_size > 1000
