"""moegrad.study.fidelity: every estimator's router gradient on the same shared checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

import moegrad
from moegrad.diagnostics import gradient_fidelity, reference_gradients
from moegrad.study.fidelity import load_checkpoint, shared_checkpoint_fidelity
from moegrad.study.tasks import Clusters


class RenormalisedClusters(Clusters):
    """The clusters task with renormalised combine weights (w_i = s_i / sum_S s): with top-1
    the weight is the constant 1 and the router gets no task gradient."""

    def build(self, estimator, options, losses, seed):
        return super().build(estimator, {**options, "normalize": True}, losses, seed)


class NoProbe(Clusters):
    def probe(self, model):
        return None


def train(task, estimator: str, steps: list[int], seed: int = 0) -> list[dict]:
    """Checkpoints {"label", "step", "state"} of one Adam run of ``task`` at ``steps``."""
    model = task.build(estimator, {}, {"switch": 1e-2}, seed)
    task.reset()
    opt = torch.optim.Adam(model.parameters(), lr=task.lr)
    out = []
    for step in range(max(steps) + 1):
        if step in steps:
            out.append({"label": f"{estimator}@{step}", "step": step,
                        "state": copy.deepcopy(model.state_dict())})
        if step == max(steps):
            return out
        loss, aux, _ = task.loss(model, task.batch(step))
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()


def hand_loaded(task, estimator: str, state: dict):
    """task.build(estimator) with every parameter/buffer of ``state`` outside the estimator."""
    model = task.build(estimator, {}, {}, 0)
    mine = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items()
                           if k in mine and not k.startswith("router.estimator.")}, strict=False)
    return model


def test_topk_top1_renormalised_is_exactly_zero_and_flagged():
    task = RenormalisedClusters(0, top_k=1)
    ckpts = train(task, "dense", [0, 15, 30])
    got = shared_checkpoint_fidelity(task, ckpts, ["topk", "dense"], taus=(1.0, 0.5), samples=2)
    labels = ["dense@0", "dense@15", "dense@30"]
    assert got["taus"] == [1.0, 0.5]
    assert got["checkpoints"] == [{"label": l, "step": s} for l, s in zip(labels, (0, 15, 30))]
    topk, dense = got["estimators"]["topk"], got["estimators"]["dense"]
    assert topk["zero_gradient_at"] == labels
    assert topk["cos_exact"] == {1.0: [0.0] * 3, 0.5: [0.0] * 3}
    assert topk["mean_after_step0"] == {1.0: 0.0, 0.5: 0.0} and topk["step0"] == {1.0: 0.0, 0.5: 0.0}
    assert topk["reference"] == "unit weights"  # w = 1 for K = 1 renormalised
    assert dense["zero_gradient_at"] == [] and all(c > 0.1 for c in dense["cos_exact"][1.0][1:])
    # independently: autograd of the task loss through the renormalised top-1 MoE on the last
    # checkpoint gives the gate nothing (up to float32 rounding of s / s), while the exact
    # expected-loss gradient it is compared with is far from zero
    with pytest.warns(UserWarning, match="no task gradient"):
        model = hand_loaded(task, "topk", ckpts[-1]["state"])
    assert model.router.config.normalize and model.router.gate.weight.abs().max() > 1e-3
    probe = task.probe(model)
    (g,) = torch.autograd.grad(probe.loss_fn(model(probe.x).y).mean(), model.router.gate.weight)
    ref = reference_gradients(model, probe.x, probe.loss_fn, tau=1.0)
    assert float(g.norm()) <= 1e-6 * float(ref.gate_exact.norm())
    assert float(ref.logits_exact.norm()) > 1e-4


def test_every_estimator_is_measured_on_the_same_checkpoint():
    """Each estimator's numbers equal gradient_fidelity on the checkpoint loaded by hand."""
    task = Clusters(0, top_k=2)
    ckpts = train(task, "topk", [0, 40])
    names = ["topk", "dense", "gumbel", "default_moe", "straight_through"]
    got = shared_checkpoint_fidelity(task, ckpts, names, taus=(1.0, 2.0), samples=3, seed=5)
    assert got["samples"] == 3
    for i, ckpt in enumerate(ckpts):
        for name in names:
            model = hand_loaded(task, name, ckpt["state"])
            probe = task.probe(model)
            if name == "default_moe":  # its EMA, filled as the first training step fills it
                with torch.no_grad():
                    model.train()(probe.x)
            for tau in (1.0, 2.0):
                ref = gradient_fidelity(probe.moe, probe.x, probe.loss_fn, [name], samples=3,
                                        tau=tau, seed=5)[name]
                d = got["estimators"][name]
                assert d["cos_exact"][tau][i] == pytest.approx(ref.cos_exact, abs=1e-9)
                assert d["sample_cos_exact"][tau][i] == pytest.approx(ref.sample_cos_exact, abs=1e-9)
                assert d["cos_dense"][i] == pytest.approx(ref.cos_dense, abs=1e-9)
            assert d["zero_gradient_at"] == [] and d["state_from_checkpoint"] == []
    dense, topk = got["estimators"]["dense"], got["estimators"]["topk"]
    # step 0 reported apart: step0 is the first checkpoint, mean_after_step0 the other
    assert dense["step0"][1.0] == dense["cos_exact"][1.0][0]
    assert dense["mean_after_step0"][1.0] == dense["cos_exact"][1.0][1]
    # the shared zero router at step 0: every token routes alike, dense is near the reference
    assert dense["step0"][1.0] > 0.99 > topk["step0"][1.0]
    # default_moe's warmed EMA changes its gradient from topk's once several experts are used
    assert got["estimators"]["default_moe"]["cos_exact"][1.0][1] != pytest.approx(
        topk["cos_exact"][1.0][1], abs=1e-6)


def test_estimator_state_comes_from_its_own_run_only():
    task = Clusters(0, top_k=2)
    [ckpt] = train(task, "noisy_topk", [20])
    w_noise = ckpt["state"]["router.estimator.w_noise"]
    assert w_noise.abs().max() > 0  # learned
    got = shared_checkpoint_fidelity(task, [ckpt], ["noisy_topk", "topk"], samples=4)
    assert got["estimators"]["noisy_topk"]["state_from_checkpoint"] == ["noisy_topk@20"]
    assert got["estimators"]["topk"]["state_from_checkpoint"] == []
    assert got["estimators"]["noisy_topk"]["step0"] == {1.0: None}
    model = task.build("noisy_topk", {}, {}, 0)
    assert load_checkpoint(model, ckpt["state"]) is True
    assert torch.equal(model.router.estimator.w_noise, w_noise)
    probe = task.probe(model)
    ref = gradient_fidelity(model, probe.x, probe.loss_fn, ["noisy_topk"], samples=4)["noisy_topk"]
    assert got["estimators"]["noisy_topk"]["cos_exact"][1.0] == [pytest.approx(ref.cos_exact, abs=1e-9)]
    # a topk checkpoint gives noisy_topk its zero-initialised noise weight
    [plain] = train(task, "topk", [5])
    fresh = task.build("noisy_topk", {}, {}, 0)
    assert load_checkpoint(fresh, plain["state"]) is False
    assert float(fresh.router.estimator.w_noise.detach().abs().max()) == 0.0


def test_caller_rng_untouched_and_bad_input_named():
    task = Clusters(0)
    ckpts = train(task, "topk", [0])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    shared_checkpoint_fidelity(task, ckpts, ["gumbel"], samples=2)
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(ValueError, match="used twice"):
        shared_checkpoint_fidelity(task, ckpts * 2, ["topk"])
    with pytest.raises(ValueError, match="non-empty list"):
        shared_checkpoint_fidelity(task, [], ["topk"])
    with pytest.raises(ValueError, match=r"checkpoints\[0\] must be a dict"):
        shared_checkpoint_fidelity(task, [{"label": "a", "state": {}}], ["topk"])
    with pytest.raises(ValueError, match=r"taus\[1\]=0"):
        shared_checkpoint_fidelity(task, ckpts, ["topk"], taus=(1.0, 0))
    with pytest.raises(ValueError, match="bogus"):
        shared_checkpoint_fidelity(task, ckpts, ["bogus"])
    with pytest.raises(ValueError, match="at least one estimator"):
        shared_checkpoint_fidelity(task, ckpts, [])
    with pytest.raises(ValueError, match="samples=0"):
        shared_checkpoint_fidelity(task, ckpts, ["topk"], samples=0)
    with pytest.raises(ValueError, match="has no probe"):
        shared_checkpoint_fidelity(NoProbe(0), ckpts, ["topk"])
    small = Clusters(0, num_experts=4).build("topk", {}, {}, 0)
    other = [{"label": "E4", "step": 0, "state": small.state_dict()}]
    with pytest.raises(ValueError, match=r"checkpoint 'E4' has other shapes.*router.gate.weight"):
        shared_checkpoint_fidelity(task, other, ["topk"])
    partial = [{"label": "p", "step": 0, "state": {"router.gate.weight": torch.zeros(8, 16)}}]
    with pytest.raises(ValueError, match=r"checkpoint 'p' does not fit.*missing \[.*experts"):
        shared_checkpoint_fidelity(task, partial, ["topk"])
    assert isinstance(task.build("topk", {}, {}, 0), moegrad.MoE)
