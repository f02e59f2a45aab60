"""moegrad study's report: verdict sentences follow the paired tests, time-limited runs are
flagged, settings and shared-checkpoint fidelity are reported, the grid summary has the
expected entries, and plots name identical curves. The runs are fake (no training)."""

import json
import math

import matplotlib.figure
import pytest

from moegrad.study.conclusions import conclusions, verdicts
from moegrad.study.markdown import num
from moegrad.study.metrics import aggregate
from moegrad.study.plots import _curves, identical_groups, write_plots
from moegrad.study.report import write_report
from moegrad.study.summary import summary_entry, write_grid_summary

T975_5 = 2.570582  # t_{0.975, 5} from a t table
TOPK = [0.30, 0.32, 0.28, 0.31, 0.29, 0.33]
DENSE_GAIN = [0.05, 0.06, 0.05, 0.04, 0.06, 0.05]  # dense = topk - gain: always lower
NOISE = [0.02, -0.03, 0.01, -0.01, 0.02, -0.02]  # unweighted = topk + noise: no signal


class FakeTask:
    name = "clusters"
    has_truth = True
    num_classes = 4

    def config(self):
        return {"num_experts": 4, "num_classes": 4}


def fake_run(name, seed, final, *, purity=0.5, stopped_by="steps", settings=None, flops=None,
             curve=None, cos=(0.5, 0.4, 0.3), rel=(0.9, 0.9, 0.9)):
    steps = [0, 50, 100]
    losses = curve or [1.0, (1.0 + final) / 2, final]
    h = {"eval_step": steps, "eval_time": [0.0, 0.5, 1.0], "val_loss": losses,
         "purity": [0.25, purity, purity], "bits_per_char": [None] * 3, "dead": [0, 0, 0],
         "load_cv": [0.1] * 3, "max_violation": [0.2] * 3, "entropy": [None, 0.5, 0.5],
         "load": [[0.25] * 4] * 3, "diag_step": [0, 50, 100], "cos_exact": list(cos),
         "cos_exact_sample": list(cos), "cos_dense": [0.3] * 3, "rel_err_exact": list(rel),
         "variance": [0.0] * 3}
    run = {"estimator": name, "seed": seed, "steps": 100 if stopped_by == "steps" else 60,
           "train_time": 1.0, "ms_per_step": 10.0, "ms_per_step_mean": 10.0,
           "stopped_by": stopped_by, "reference": "softmax weights", "history": h}
    if settings is not None:
        run["settings"] = settings
        run["time_limited"] = stopped_by == "time"
    if flops is not None:
        h["flops"] = [0.0, flops * 50, flops * 100]
        run["flops_per_step"] = flops
    return run


def six_seed_runs(**kw):
    runs = []
    for s in range(6):
        runs.append(fake_run("topk", s, TOPK[s], purity=0.5, **kw))
        runs.append(fake_run("dense", s, TOPK[s] - DENSE_GAIN[s], purity=0.9, **kw))
        runs.append(fake_run("unweighted", s, TOPK[s] + NOISE[s], purity=0.3, **kw))
    return runs


def test_verdicts_follow_the_tests_significant_and_not():
    doc = aggregate(six_seed_runs(), FakeTask(), {"seeds": 6, "steps": 100, "time_budget": 60.0})
    # old-style runs (no settings, no flops) aggregate: settings None, no equal-FLOPs field
    assert doc["settings"] is None and doc["cell"] == "default" and doc["flops_budget"] is None
    assert "loss_at_equal_flops" not in doc["estimators"]["topk"]
    stat = doc["estimators"]["dense"]["final_loss"]
    finals = [t - g for t, g in zip(TOPK, DENSE_GAIN)]
    m = sum(finals) / 6
    sd = math.sqrt(sum((x - m) ** 2 for x in finals) / 5)
    assert stat["n"] == 6 and stat["mean"] == pytest.approx(m) and stat["sd"] == pytest.approx(sd)
    assert stat["ci95"][0] == pytest.approx(m - T975_5 * sd / math.sqrt(6), rel=1e-6)

    by = {(c["metric"], c["a"], c["b"]): c for c in doc["comparisons"]}
    dense = by[("final_loss", "dense", "topk")]
    unw = by[("final_loss", "unweighted", "topk")]
    assert dense["significant"] and not unw["significant"]
    # the paired difference by hand
    gain = sum(DENSE_GAIN) / 6
    sd_d = math.sqrt(sum((g - gain) ** 2 for g in DENSE_GAIN) / 5)
    half = T975_5 * sd_d / math.sqrt(6)
    assert dense["mean_diff"] == pytest.approx(-gain)
    assert dense["ci95"] == [pytest.approx(-gain - half, rel=1e-6), pytest.approx(-gain + half, rel=1e-6)]
    # Holm over the 3 pairs of final_loss: dense-topk has the smallest raw p, so x3
    assert dense["p_holm"] == pytest.approx(min(1.0, 3 * dense["p"]))

    text = verdicts(doc)
    sig = (f"`dense`: final validation loss lower than `topk` by {num(gain)} (uncorrected 95% CI "
           f"{num(gain - half)} to {num(gain + half)}), p < 0.001 after Holm "
           f"correction, n = 6 seeds.")
    assert dense["p_holm"] < 0.001
    assert sig in text
    assert sig.startswith("`dense`: final validation loss lower than `topk` by 0.0517 (uncorrected "
                          "95% CI 0.0438 to 0.0596)")
    nonsig = [t for t in text if t.startswith("`unweighted`: final validation loss")]
    assert len(nonsig) == 1
    assert nonsig[0].startswith("`unweighted`: final validation loss not distinguishable from "
                                f"`topk` (p = {unw['p_holm']:.2g} after Holm correction, n = 6 seeds")
    assert unw["p_holm"] > 0.5
    # no sentence ranks by means: no "best", no "order:"
    joined = " ".join(conclusions(doc))
    assert "best" not in joined and "order:" not in joined and "Lowest" not in joined


def test_two_seeds_give_no_verdict_and_say_so(tmp_path):
    runs = [r for r in six_seed_runs() if r["seed"] < 2]
    doc = aggregate(runs, FakeTask(), {"seeds": 2, "steps": 100, "time_budget": 60.0})
    assert all(not c["tested"] and c["p_holm"] is None for c in doc["comparisons"])
    text = verdicts(doc)
    line = [t for t in text if t.startswith("`dense` vs `topk`, final validation loss")][0]
    assert "2 seeds: too few for a test" in line and "means only, no verdict" in line
    assert "lower than" not in " ".join(text) and "higher than" not in " ".join(text)
    write_report(doc, tmp_path, "moegrad study --seeds 2")
    report = (tmp_path / "report.md").read_text()
    assert "2 seeds: too few for a paired test" in report and "| too few seeds |" in report


def test_time_limited_runs_settings_and_equal_flops_in_every_table(tmp_path):
    settings = {"task": "clusters", "regime": "scratch", "top_k": 2, "num_experts": 8,
                "losses": {"switch": 0.01}, "router_init": "zero", "lr": 0.003,
                "num_classes": 4, "dim": 16}
    runs = []
    for s in range(3):
        runs.append(fake_run("topk", s, TOPK[s], settings=settings, flops=100.0))
        # dense costs 2x the FLOPs: at topk's budget (10000) it has done 50 steps
        runs.append(fake_run("dense", s, TOPK[s] - 0.05, settings=settings, flops=200.0,
                             stopped_by="time" if s == 1 else "steps"))
    doc = aggregate(runs, FakeTask(), {"seeds": 3, "steps": 100, "time_budget": 60.0,
                                       "cell": "top2-switch"})
    assert doc["cell"] == "top2-switch" and doc["settings"] == settings
    assert doc["flops_budget"] == 10000.0
    d = doc["estimators"]["dense"]
    assert d["time_limited_seeds"] == [1] and doc["time_limited_runs"][0]["seed"] == 1
    # loss at 10000 FLOPs: dense's evaluation at step 50 (cumulative 10000), (1 + final) / 2
    assert d["loss_at_equal_flops"]["values"] == pytest.approx([(1 + TOPK[s] - 0.05) / 2 for s in range(3)])
    assert d["flops_per_step"]["mean"] == 200.0
    assert any(c["metric"] == "loss_at_equal_flops" for c in doc["comparisons"])
    write_report(doc, tmp_path, "moegrad study --top-k 2")
    report = (tmp_path / "report.md").read_text()
    assert "| experts per token (top-k) | 2 |" in report and "| balance losses | switch=0.01 |" in report
    assert "cell `top2-switch`" in report
    assert "loss at equal FLOPs (1e+04)" in report and "| 200 |" in report
    # every table (outcome, routing health, compute, comparisons, fidelity) flags dense
    tables = report.split("\n## ")
    flagged = [t for t in tables if "| `dense` † |" in t]
    assert len(flagged) == 5
    assert "`dense` seed 1 (60 steps)" in report
    assert "stopped by the time budget: `dense` seed 1" in " ".join(verdicts(doc))
    assert "machine-dependent" in report
    assert json.loads((tmp_path / "metrics.json").read_text())["cell"] == "top2-switch"


def test_own_trajectory_fidelity_leaves_step0_out_and_flags_zero_gradients(tmp_path):
    runs = []
    for s in range(3):
        runs.append(fake_run("topk", s, TOPK[s], cos=(0.4, 0.5, 0.6)))
        runs.append(fake_run("dense", s, TOPK[s] - 0.05, cos=(1.0, 0.4, 0.2)))
        # zero router gradient after step 0: cosine 0 and relative error exactly 1
        runs.append(fake_run("sparsemixer", s, TOPK[s], cos=(0.7, 0.0, 0.0), rel=(0.5, 1.0, 1.0)))
    doc = aggregate(runs, FakeTask(), {"seeds": 3, "steps": 100, "time_budget": 60.0})
    per = doc["estimators"]
    assert per["dense"]["cos_exact"]["mean"] == pytest.approx(0.3)  # (0.4 + 0.2) / 2, not 1.0
    assert per["dense"]["cos_exact_initial"]["mean"] == 1.0
    assert per["sparsemixer"]["zero_gradient"] == [{"seed": s, "steps": [50, 100]} for s in range(3)]
    assert per["topk"]["zero_gradient"] == []
    text = " ".join(conclusions(doc))
    assert "own training trajectory" in text
    assert "`sparsemixer` in 3 of 3 seeds (first at step 50)" in text
    write_report(doc, tmp_path, "moegrad study")
    report = (tmp_path / "report.md").read_text()
    assert "(each estimator's own trajectory)" in report
    assert "| `dense` | 1.00 ± 0.00 | 0.30 ± 0.00 |" in report


def test_shared_checkpoint_fidelity_is_reported_when_present(tmp_path):
    doc = aggregate(six_seed_runs(), FakeTask(), {"seeds": 6, "steps": 100, "time_budget": 60.0})
    # as after a JSON round trip: tau keys are strings
    doc["fidelity"] = {
        "taus": [0.5, 1.0], "checkpoints": [{"label": "s0", "step": 0}, {"label": "s50", "step": 50},
                                          {"label": "s100", "step": 100}],
        "estimators": {
            "topk": {"cos_exact": {}, "mean_after_step0": {"0.5": 0.55, "1.0": 0.48},
                     "step0": {"0.5": 0.3, "1.0": 0.37}, "zero_gradient_at": []},
            "dense": {"cos_exact": {}, "mean_after_step0": {"0.5": 0.50, "1.0": 0.43},
                      "step0": {"0.5": 1.0, "1.0": 1.0}, "zero_gradient_at": []},
            "sparsemixer": {"cos_exact": {}, "mean_after_step0": {"0.5": 0.1, "1.0": 0.6},
                            "step0": {"0.5": 0.7, "1.0": 0.7}, "zero_gradient_at": ["s100"]}}}
    text = " ".join(conclusions(doc))
    assert "3 shared checkpoints (steps 0, 50, 100)" in text
    assert "`sparsemixer`: router gradient exactly zero on 1 of 3 shared checkpoints (s100)" in text
    assert "tau = 0.5: `topk`, tau = 1.0: `sparsemixer`" in text  # the ordering moves with tau
    assert "own training trajectory" not in text
    write_report(doc, tmp_path, "moegrad study")
    report = (tmp_path / "report.md").read_text()
    assert "## Router-gradient fidelity (shared checkpoints)" in report
    assert "| `dense` | 1.00 | 1.00 | 0.50 | 0.43 | 0 of 3 |" in report
    assert "| `sparsemixer` | 0.70 | 0.70 | 0.10 | 0.60 | 1 of 3 (s100) |" in report


def _capture_figures(monkeypatch):
    figs = []
    original = matplotlib.figure.Figure.savefig

    def savefig(self, *a, **k):
        figs.append(self)
        return original(self, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return figs


def _assert_labelled(fig):
    axes = [ax for ax in fig.axes if ax.axison]
    assert axes
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
    assert any(ax.get_legend() is not None for ax in fig.axes) or fig.legends


def test_plots_mark_identical_curves_and_label_every_axis(tmp_path, monkeypatch):
    runs = []
    for s in range(3):
        runs.append(fake_run("topk", s, TOPK[s]))
        runs.append(fake_run("unweighted", s, TOPK[s]))  # identical to topk in every seed
        runs.append(fake_run("dense", s, TOPK[s] - 0.05, purity=0.9))
    assert identical_groups(runs, "val_loss") == [["topk", "unweighted"]]
    doc = aggregate(runs, FakeTask(), {"seeds": 3, "steps": 100, "time_budget": 60.0,
                                       "diag_samples": 8})
    figs = _capture_figures(monkeypatch)
    written = write_plots(runs, doc, tmp_path)
    assert set(written) == {"loss_vs_step.png", "loss_vs_time.png", "load.png",
                            "grad_cosine.png", "purity.png"}
    assert len(figs) == 5
    for fig in figs:
        _assert_labelled(fig)
    legend = [t.get_text() for t in figs[0].axes[0].get_legend().get_texts()]
    assert "unweighted (= topk, identical)" in legend and "topk" in legend
    lines = figs[0].axes[0].get_lines()
    assert len({(str(l.get_linestyle()), l.get_marker()) for l in lines}) == 3  # distinct styles
    assert any(l.get_markevery() is not None for l in lines)
    assert doc["plot_notes"][0].startswith("`topk`, `unweighted`: identical validation loss curves")
    # identical purity curves too (all three share the purity 0.5 / 0.9 pattern: topk = unweighted)
    assert any("purity curves" in n for n in doc["plot_notes"])
    write_report(doc, tmp_path, "moegrad study")
    report = (tmp_path / "report.md").read_text()
    assert "- Note: `topk`, `unweighted`: identical validation loss curves" in report
    # identical final losses in every seed: the verdict says so (test, not means)
    assert any("identical to `topk` in every one of the n = 3 seeds" in v for v in verdicts(doc))
    for png in written:
        assert (tmp_path / png).stat().st_size > 1000


def test_curves_returns_the_legend_labels():
    import matplotlib.pyplot as plt

    runs = [fake_run("topk", 0, 0.3), fake_run("dense", 0, 0.2, stopped_by="time")]
    fig, ax = plt.subplots()
    labels = _curves(ax, runs, "eval_step", "val_loss", "step", "loss")
    plt.close(fig)
    assert labels == ["dense † 1 run(s) stopped by time", "topk"]


def test_write_grid_summary_tables_and_figure(tmp_path, monkeypatch):
    cell_a = aggregate(six_seed_runs(), FakeTask(), {"seeds": 6, "steps": 100,
                                                      "time_budget": 60.0, "cell": "top1"})
    two = [r for r in six_seed_runs() if r["seed"] < 2]
    cell_b = aggregate(two, FakeTask(), {"seeds": 2, "steps": 100, "time_budget": 60.0,
                                         "cell": "top2"})
    figs = _capture_figures(monkeypatch)
    write_grid_summary([cell_a, cell_b], tmp_path, "moegrad study --grid top_k=1,2")
    text = (tmp_path / "summary.md").read_text()
    assert (tmp_path / "summary.png").stat().st_size > 1000
    assert len(figs) == 1
    _assert_labelled(figs[0])
    by = {(c["metric"], c["a"]): c for c in cell_a["comparisons"] if c["b"] == "topk"}
    dense, unw = by[("final_loss", "dense")], by[("final_loss", "unweighted")]
    e_dense = f"{num(dense['mean_diff'])} [{num(dense['ci95'][0])}, {num(dense['ci95'][1])}] *"
    e_unw = f"{num(unw['mean_diff'])} [{num(unw['ci95'][0])}, {num(unw['ci95'][1])}] n.s."
    assert e_dense == "-0.0517 [-0.0596, -0.0438] *"
    b_dense = -sum(DENSE_GAIN[:2]) / 2
    assert summary_entry(cell_b, "dense", "final_loss") == f"{num(b_dense)} (n = 2, no test)"
    assert "## final validation loss vs `topk`" in text and "## routing purity vs `topk`" in text
    assert "| estimator | `top1` | `top2` |" in text
    assert f"| `dense` | {e_dense} | -0.055 (n = 2, no test) |" in text
    assert f"| `unweighted` | {e_unw} |" in text
    assert "| `topk` (mean ± sd) | 0.3050 ± 0.0187 | 0.3100 ± 0.0141 |" in text
    assert "moegrad study --grid top_k=1,2" in text
    with pytest.raises(ValueError, match="docs=\\[\\]"):
        write_grid_summary([], tmp_path, "x")
