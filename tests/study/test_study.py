"""moegrad study: the tasks, one training run, and the CLI end to end on a reduced budget."""

import json
import math

import pytest
import torch

from moegrad import estimators
from moegrad.cli import build_parser, main
from moegrad.study.report import FIELDS
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
    assert dense["final_loss"]["mean"] < unweighted["final_loss"]["mean"]
    report = (out / "report.md").read_text()
    assert "| `dense` |" in report and "## Conclusions" in report and "Purity >= 0.9" in report
    for png in ("loss_vs_step.png", "loss_vs_time.png", "load.png", "grad_cosine.png", "purity.png"):
        assert (out / png).stat().st_size > 1000
