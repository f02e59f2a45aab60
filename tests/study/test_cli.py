"""moegrad study's command line: settings as options, the grid, the progress bar's cost model."""

import json
from pathlib import Path

import pytest

from moegrad.cli import build_parser, main
from moegrad.study import runner
from moegrad.study.cli import _cell_commands
from moegrad.study.grid import cell_name, grid_cells
from moegrad.study.progress import Progress
from moegrad.study.settings import task_kwargs
from moegrad.study.tasks import Clusters


def test_every_setting_option_is_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = capsys.readouterr().out
    for option in ("--top-k", "--experts", "--losses", "--router-init", "--lr", "--clusters",
                   "--dim", "--layers", "--width", "--regime", "--pretrain-steps", "--grid",
                   "--flops-budget", "--routing", "sinkhorn", "routing=topk,sinkhorn",
                   "zero", "normal", "uniform", "scratch", "finetune",
                   "losses=none,switch=0.01", "joined by '+'"):
        assert option in text, option


def test_options_parse_into_settings():
    args = build_parser().parse_args([
        "study", "--top-k", "2", "--experts", "16", "--router-init", "normal", "--lr", "0.001",
        "--clusters", "6", "--dim", "8", "--regime", "finetune", "--losses", "switch=0.01+z_loss=0.001",
        "--grid", "losses=none,switch=0.01+z_loss=0.001", "lr=0.001,0.003", "task=clusters,charlm"])
    assert (args.top_k, args.experts, args.router_init, args.lr) == (2, 16, "normal", 0.001)
    assert (args.clusters, args.dim, args.regime) == (6, 8, "finetune")
    assert args.losses == {"switch": 0.01, "z_loss": 0.001}
    assert args.grid == {"losses": [{}, {"switch": 0.01, "z_loss": 0.001}],
                         "lr": [0.001, 0.003], "task": ["clusters", "charlm"]}
    defaults = build_parser().parse_args(["study"])
    assert (defaults.top_k, defaults.experts, defaults.router_init, defaults.regime,
            defaults.grid) == (None, None, None, None, None)


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "0"], "argument --top-k: expected an integer >= 1, got 0"),
    (["--experts", "x"], "argument --experts: expected an integer >= 1, got 'x'"),
    (["--router-init", "xavier"], "argument --router-init: 'xavier' is not one of zero, normal, uniform"),
    (["--lr", "-1"], "argument --lr: expected a finite number > 0, got -1"),
    (["--lr", "nan"], "argument --lr: expected a finite number > 0, got nan"),
    (["--regime", "pretrain"], "argument --regime: 'pretrain' is not one of scratch, finetune"),
    (["--clusters", "0"], "argument --clusters: expected an integer >= 1, got 0"),
    (["--dim", "0"], "argument --dim: expected an integer >= 1, got 0"),
    (["--layers", "0"], "argument --layers: expected an integer >= 1, got 0"),
    (["--width", "-4"], "argument --width: expected an integer >= 1, got -4"),
    (["--pretrain-steps", "0"], "argument --pretrain-steps: expected an integer >= 1, got 0"),
    (["--flops-budget", "0"], "argument --flops-budget: expected a finite number > 0, got 0"),
    (["--losses", "switch=-1"], "argument --losses: coefficient of 'switch' must be a finite number >= 0"),
    (["--grid", "bogus=1,2"], "argument --grid: grid items are KEY=V1,V2,... with KEY one of task, "
                              "regime, top_k, experts, losses, router_init, lr, routing, balancer; got "
                              "'bogus=1,2'"),
    (["--grid", "top_k"], "argument --grid: grid items are KEY=V1,V2,..."),
    (["--grid", "top_k=1,1"], "argument --grid: grid item 'top_k=1,1' repeats the value '1'"),
    (["--grid", "top_k=1,"], "argument --grid: grid item 'top_k=1,' has an empty value"),
    (["--grid", "top_k=0,1"], "argument --grid: top_k value '0': expected an integer >= 1, got 0"),
    (["--grid", "losses=switch"], "argument --grid: losses value 'switch': losses expect "
                                  "name=coefficient pairs"),
    (["--grid", "router_init=zero,he"], "argument --grid: router_init value 'he': 'he' is not one "
                                        "of zero, normal, uniform"),
    (["--grid", "task=clusters,mnist"], "argument --grid: task value 'mnist'"),
    (["--grid", "regime=scratch,rl"], "argument --grid: regime value 'rl'"),
    (["--grid", "top_k=1,2", "top_k=3"], "argument --grid: key 'top_k' is given twice"),
])
def test_bad_values_are_refused_naming_the_option(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["study", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "3", "--experts", "2"], "--top-k 3 exceeds --experts 2"),
    (["--experts", "3"], "--experts 3 is fewer than the 4 clusters (--clusters)"),
    (["--experts", "6", "--clusters", "7"], "--experts 6 is fewer than the 7 clusters"),
    (["--task", "charlm", "--clusters", "6"], "--clusters applies to --task clusters only, not charlm"),
    (["--dim", "8", "--task", "charlm"], "--dim applies to --task clusters only"),
    (["--layers", "3"], "--layers applies to --task charlm only, not clusters"),
    (["--task", "charlm", "--width", "50"], "--width 50 must be a multiple of the 4 attention heads"),
    (["--top-k", "2", "--grid", "top_k=1,2"], "--top-k is also a --grid key (top_k)"),
    (["--losses", "switch=0.01", "--grid", "losses=none,switch=0.1"], "--losses is also a --grid key"),
    (["--grid", "experts=2,8"], "--experts 2 is fewer than the 4 clusters"),
])
def test_inconsistent_settings_stop_before_training(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    code = main(["study", "--no-progress", "--out", str(out), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing ran


def test_task_kwargs_map_options_to_the_task():
    assert task_kwargs("clusters", {"top_k": 2, "experts": 16, "clusters": 6, "dim": 8,
                                    "router_init": "normal", "lr": 0.01, "layers": None}) == \
        {"top_k": 2, "num_experts": 16, "num_classes": 6, "dim": 8, "router_init": "normal",
         "lr": 0.01}
    assert task_kwargs("charlm", {"width": 32, "layers": 1, "top_k": None}) == {"dim": 32, "layers": 1}


def test_grid_cells_and_names():
    grid = {"top_k": [1, 2], "losses": [{}, {"switch": 0.01, "z_loss": 0.001}]}
    cells = grid_cells(grid)
    assert cells == [{"top_k": 1, "losses": {}}, {"top_k": 1, "losses": {"switch": 0.01, "z_loss": 0.001}},
                     {"top_k": 2, "losses": {}}, {"top_k": 2, "losses": {"switch": 0.01, "z_loss": 0.001}}]
    assert [cell_name(c) for c in cells] == ["k1_noloss", "k1_switch0.01+z_loss0.001",
                                             "k2_noloss", "k2_switch0.01+z_loss0.001"]
    assert cell_name({"task": "charlm", "regime": "finetune", "experts": 16,
                      "router_init": "normal", "lr": 0.001}) == "charlm_finetune_e16_init-normal_lr0.001"
    commands = _cell_commands(["--quick", "--grid", "top_k=1,2", "losses=none,switch=0.01+z_loss=0.001",
                               "--seeds", "3", "--out", "x"], cells, Path("x"))
    assert commands["k2_switch0.01+z_loss0.001"] == \
        "moegrad study --quick --seeds 3 --top-k 2 --losses switch=0.01,z_loss=0.001 " \
        "--out x/k2_switch0.01+z_loss0.001"
    assert commands["k1_noloss"].endswith("--top-k 1 --losses none --out x/k1_noloss")
    tasks = grid_cells({"task": ["clusters", "charlm"]})
    commands = _cell_commands(["--grid", "task=clusters,charlm", "--width", "16", "--clusters=6",
                               "--steps", "9"], tasks, Path("y"))
    assert commands == {"clusters": "moegrad study --clusters=6 --steps 9 --task clusters --out y/clusters",
                        "charlm": "moegrad study --width 16 --steps 9 --task charlm --out y/charlm"}


def test_grid_runs_every_cell_with_its_settings(tmp_path, capsys):
    out = tmp_path / "grid"
    code = main(["study", "--estimators", "topk,dense", "--steps", "4", "--seeds", "2",
                 "--eval-every", "2", "--diag-every", "0", "--no-progress", "--experts", "4",
                 "--flops-budget", "1e6", "--grid", "top_k=1,2", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "wrote 2 cells under" in captured.out
    for k in (1, 2):
        cell = out / f"k{k}"
        doc = json.loads((cell / "metrics.json").read_text())
        expected = {"task": "clusters", "regime": "scratch", "top_k": k, "num_experts": 4,
                    "losses": {}, "router_init": "zero", "lr": 0.003, "routing": "topk", "balancer": "none",
                    "num_classes": 4, "dim": 16}
        assert doc["settings"] == expected
        assert doc["cell"] == f"k{k}" and doc["args"]["flops_budget"] == 1e6
        assert len(doc["runs"]) == 4
        for run in doc["runs"]:
            assert run["settings"] == expected
            assert run["steps"] == 4 and run["time_limited"] is False
            assert run["history"]["eval_step"] == [0, 2, 4]
        assert sorted(doc["estimators"]) == ["dense", "topk"]
        report_md = (cell / "report.md").read_text()
        assert f"--top-k {k} --out {cell}" in report_md  # the cell's own command
    assert (out / "summary.md").exists() and (out / "summary.png").exists()


def test_progress_prices_runs_in_seconds_and_counts_time_limited_runs():
    bar = Progress(True, "test")
    bar.add(10.0, 10)
    bar.add(5.0, 10)
    bar.start()
    on_step, finish = bar.run("a", 10, 10.0)
    for _ in range(4):
        on_step()
    assert bar.bar.n == pytest.approx(4.0) and bar.bar.total == pytest.approx(15.0)
    finish(4)  # stopped by the clock after 4 of 10 steps: the rest of its price is done
    assert bar.bar.n == pytest.approx(10.0) and bar.steps_done == 10
    on_step, finish = bar.run("b", 10, 5.0)
    for _ in range(10):
        on_step()
    finish(10)
    assert bar.bar.n == pytest.approx(15.0) and bar.steps_done == 20
    assert bar.bar.smoothing == 0.0  # the rate is the average since the start
    bar.close()


DRIFT_FIELDS = {"layer", "num_experts", "top_k", "tokens", "topk_overlap", "js_divergence",
                "load_a", "load_b", "revived", "killed"}


def test_finetune_regime_pretrains_once_per_seed_and_reports_drift(tmp_path, monkeypatch):
    calls = []
    original = runner.pretrain

    def counting(task, seed, **kwargs):
        calls.append(seed)
        return original(task, seed, **kwargs)

    monkeypatch.setattr(runner, "pretrain", counting)  # where run_cell looks it up
    out = tmp_path / "ft"
    code = main(["study", "--regime", "finetune", "--estimators", "topk,dense,default_moe",
                 "--steps", "8", "--pretrain-steps", "12", "--seeds", "2", "--eval-every", "4",
                 "--diag-every", "0", "--no-progress", "--out", str(out)])
    assert code == 0
    assert calls == [0, 1]  # once per seed, not once per estimator
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["settings"]["regime"] == "finetune" and doc["args"]["pretrain_steps"] == 12
    assert [p["seed"] for p in doc["pretrain"]] == [0, 1]
    assert all(p["steps"] == 12 and p["estimator"] == "topk" and p["losses"] == {"switch": 0.01}
               for p in doc["pretrain"])
    assert doc["task_config"]["shift"] > 0  # scored on the shifted distribution
    for run in doc["runs"]:
        assert run["settings"]["regime"] == "finetune"
        assert run["before"]["val_loss"] == run["history"]["val_loss"][0]
        assert run["before"]["purity"] == run["history"]["purity"][0]
        assert len(run["drift"]) == 1 and set(run["drift"][0]) == DRIFT_FIELDS
        assert run["drift"][0]["tokens"] == 2048 and 0 <= run["drift"][0]["topk_overlap"] <= 1
        assert run["pretrain"]["seed"] == run["seed"]
    # the per-estimator drift statistics and the report's fine-tuning table come from the runs
    for name, stats in doc["estimators"].items():
        mine = [r for r in doc["runs"] if r["estimator"] == name]
        assert stats["loss_before"]["values"] == [r["before"]["val_loss"] for r in mine]
        assert stats["drift_js"]["values"] == [r["drift"][0]["js_divergence"] for r in mine]
        assert stats["experts_killed"]["values"] == [len(r["drift"][0]["killed"]) for r in mine]
    report = (out / "report.md").read_text()
    assert "## Fine-tuning: before and after, and routing drift" in report
    assert "| `dense` | " + f"{doc['estimators']['dense']['loss_before']['mean']:.4f}" in report
    # every estimator of a seed starts from the same pretrained model; these three share
    # topk's forward (softmax weights), so their loss before fine-tuning is the same
    for seed in (0, 1):
        befores = {r["before"]["val_loss"] for r in doc["runs"] if r["seed"] == seed}
        assert len(befores) == 1
    # the pretrained checkpoint beats a fresh zero-router model on the shifted task
    fresh = Clusters(0).shifted()
    assert doc["runs"][0]["before"]["val_loss"] < fresh.evaluate(fresh.build("topk", {}, {}, 0))["val_loss"]


def test_shared_checkpoint_fidelity_is_in_the_cell_document(tmp_path):
    doc_out = tmp_path / "fid"
    main(["study", "--estimators", "topk,dense,unweighted", "--steps", "8", "--seeds", "1",
          "--eval-every", "4", "--diag-every", "0", "--no-progress", "--out", str(doc_out)])
    doc = json.loads((doc_out / "metrics.json").read_text())
    fid = doc["fidelity"]
    assert [c["label"] for c in fid["checkpoints"]] == ["start@0", "topk@2", "topk@4", "topk@8",
                                                        "dense@2", "dense@4", "dense@8"]
    assert fid["taus"] == [0.5, 1.0, 2.0]
    assert sorted(fid["estimators"]) == ["dense", "topk", "unweighted"]
    # unweighted gives the router no task gradient on any checkpoint
    assert fid["estimators"]["unweighted"]["zero_gradient_at"] == [c["label"] for c in fid["checkpoints"]]
    assert fid["estimators"]["dense"]["zero_gradient_at"] == []


def test_public_names_stay_importable_from_the_modules_that_defined_them():
    """cli.py and report.py were split by concern; their public names did not move for users."""
    import moegrad.study
    from moegrad.study import cli, grid_runner, metrics, report, settings, summary

    assert cli.run_study is runner.run_study is moegrad.study.run_study
    assert cli.run_grid is grid_runner.run_grid
    assert (cli.Progress, cli.task_kwargs, cli.grid_cells, cli.cell_name) == (
        Progress, task_kwargs, grid_cells, cell_name)
    assert cli.TASK_KNOBS is settings.TASK_KNOBS and cli.FIDELITY_TAUS == (0.5, 1.0, 2.0)
    assert report.aggregate is metrics.aggregate and report.write_grid_summary is summary.write_grid_summary
    for module in (cli, report):
        assert all(hasattr(module, name) for name in module.__all__), module.__name__
    with pytest.raises(AttributeError):
        cli.no_such_name  # noqa: B018


def test_routing_option_and_grid_key_build_every_moe_with_it_and_record_it(tmp_path, monkeypatch):
    built = []
    original = Clusters.build

    def recording(self, estimator, options, losses, seed):
        model = original(self, estimator, options, losses, seed)
        built.append((estimator, [m.router.config.routing for m in self.moes(model)]))
        return model

    monkeypatch.setattr(Clusters, "build", recording)
    out = tmp_path / "grid"
    code = main(["study", "--estimators", "topk,dense", "--steps", "4", "--seeds", "1",
                 "--eval-every", "2", "--diag-every", "0", "--no-progress", "--top-k", "2",
                 "--grid", "routing=topk,sinkhorn", "--out", str(out)])
    assert code == 0
    for routing in ("topk", "sinkhorn"):
        doc = json.loads((out / routing / "metrics.json").read_text())
        assert doc["settings"]["routing"] == routing and doc["cell"] == routing
        assert all(r["settings"]["routing"] == routing for r in doc["runs"])
        assert "| routing (selection method) | " + routing + " |" in (out / routing / "report.md").read_text()
        assert f"--routing {routing} --out {out / routing}" in (out / routing / "report.md").read_text()
    assert {r for _, rs in built for r in rs} == {"topk", "sinkhorn"}
    single = tmp_path / "one"
    assert main(["study", "--estimators", "topk", "--steps", "2", "--seeds", "1", "--diag-every",
                 "0", "--no-progress", "--routing", "sinkhorn", "--out", str(single)]) == 0
    assert json.loads((single / "metrics.json").read_text())["settings"]["routing"] == "sinkhorn"


def test_sinkhorn_study_runs_the_deterministic_estimators_and_refuses_sampling_ones(capsys):
    from moegrad.study.settings import Cell

    common = dict(quick=True, steps=2, seeds=1, time_budget=None, losses=None, eval_every=None,
                  diag_every=0, diag_samples=1, tau=1.0, impl="auto", regime=None,
                  pretrain_steps=None, options={})
    cell = Cell("clusters", None, routing="sinkhorn", **common)
    assert cell.names == ["default_moe", "dense", "straight_through", "topk", "unweighted"]
    assert cell.task(0).routing == "sinkhorn"
    with pytest.raises(ValueError, match=r"--routing sinkhorn cannot be combined with the "
                                         r"estimator\(s\) \['gumbel'\] \(they select by sampling\)"):
        Cell("clusters", ["topk", "gumbel"], routing="sinkhorn", **common)
    assert main(["study", "--routing", "sinkhorn", "--estimators", "noisy_topk", "--steps", "2",
                 "--no-progress", "--out", "unused"]) == 2
    assert "cannot be combined with the estimator(s) ['noisy_topk']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["study", "--routing", "top_k"])


@pytest.mark.parametrize("routing, name", [("remoe", "remoe"), ("expert_choice", "topk")])
def test_pair_routing_study_runs_two_steps_and_says_what_is_not_applicable(tmp_path, routing, name):
    out = tmp_path / routing
    assert main(["study", "--steps", "2", "--seeds", "1", "--eval-every", "1", "--no-progress",
                 "--routing", routing, "--out", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc["estimators"]) == [name] and doc["args"]["estimators"] == [name]
    assert doc["settings"]["routing"] == routing and doc["settings"]["losses"] == {}
    assert doc["settings"]["router_init"] == ("normal" if routing == "remoe" else "zero")
    run = doc["runs"][0]
    assert run["steps"] == 2 and run["history"]["diag_step"] == []
    assert "n/a under routing=" in run["diagnostics"] and "fidelity" not in doc
    assert doc["estimators"][name]["cos_exact"]["mean"] is None
    active = run["history"]["active"]
    assert active[0] is None and all(0 <= a <= 8 for a in active[1:])
    assert doc["estimators"][name]["active_experts"]["mean"] == active[-1]
    assert doc["estimators"][name]["sampling"] is False
    report = (out / "report.md").read_text()
    assert "## Router-gradient fidelity: n/a under routing=" in report
    assert "active experts per token" in report


def test_routing_grid_takes_every_routing_and_refuses_estimators_under_remoe(tmp_path, capsys):
    args = build_parser().parse_args(["study", "--grid", "routing=topk,sinkhorn,expert_choice,remoe",
                                      "balancer=none,bias,quantile"])
    assert args.grid == {"routing": ["topk", "sinkhorn", "expert_choice", "remoe"],
                         "balancer": ["none", "bias", "quantile"]}
    out = tmp_path / "g"
    assert main(["study", "--steps", "2", "--seeds", "1", "--no-progress", "--estimators", "topk",
                 "--grid", "routing=topk,remoe", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--estimators topk cannot be combined with --routing remoe" in err
    assert not out.exists()  # refused before anything trains
    assert main(["study", "--steps", "2", "--seeds", "1", "--no-progress", "--routing",
                 "expert_choice", "--losses", "switch=0.01", "--out", str(out)]) == 2
    assert "takes the balance loss(es) ['z_loss'] only" in capsys.readouterr().err
    assert main(["study", "--steps", "2", "--seeds", "1", "--no-progress", "--routing", "sinkhorn",
                 "--balancer", "bias", "--out", str(out)]) == 2
    assert "--balancer bias needs --routing topk" in capsys.readouterr().err
