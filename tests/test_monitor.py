"""moegrad.diagnostics.RoutingMonitor against the layer outputs, recomputed by hand."""

import math
import statistics

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import moegrad
from moegrad.diagnostics import RoutingMonitor


class Net(nn.Module):
    """Two MoE layers: a dropless one with two losses, one with capacity (drops pairs)."""

    def __init__(self):
        super().__init__()
        self.a = moegrad.MoE(dim=8, hidden_dim=12, num_experts=6, top_k=2,
                             losses={"switch": 1e-2, "z_loss": 1e-3})
        self.b = moegrad.MoE(dim=8, hidden_dim=12, num_experts=4, top_k=1, capacity_factor=0.5)
        self.outs = []  # every layer output, for the reference

    def forward(self, x, mask=None, ckpt=False):
        call = (lambda f, *a: checkpoint(f, *a, use_reentrant=False)) if ckpt else (lambda f, *a: f(*a))
        oa = call(self.a, x, mask)
        ob = call(self.b, x + oa.y, mask)
        self.outs.append((oa, ob))
        return ob.y


def reference(outs, num_experts):
    """The metrics of one layer's outputs, written from Routing.indices, scores and stats."""
    counts = [0] * num_experts
    h_sum, tokens = 0.0, 0
    for o in outs:
        r = o.routing
        real = torch.ones(r.indices.shape[0], dtype=torch.bool) if r.mask is None else r.mask
        for i in r.indices[real].reshape(-1).tolist():
            counts[i] += 1
        for row in r.scores[real].double().tolist():
            h_sum += -sum(p * math.log(p) for p in row if p > 0) / math.log(num_experts)
            tokens += 1
    mean = sum(counts) / num_experts
    out = {"load_cv": statistics.pstdev(counts) / mean, "max_violation": max(counts) / mean - 1,
           "dead_experts": float(sum(c == 0 for c in counts)), "entropy": h_sum / tokens,
           "dropped": float(sum(int(o.stats.dropped) for o in outs))}
    for name in outs[0].losses:
        out[f"loss/{name}"] = sum(float(o.losses[name].detach()) for o in outs) / len(outs)
    return out


def check(values, net, outs):
    expect = {}
    for layer, i, e in (("a", 0, 6), ("b", 1, 4)):
        expect.update({f"moe/{layer}/{k}": v for k, v in reference([o[i] for o in outs], e).items()})
    assert values.keys() == expect.keys()
    for key, want in expect.items():
        assert values[key] == pytest.approx(want, rel=1e-6, abs=1e-9), key


def test_monitor_matches_the_layer_outputs_since_the_last_read():
    net = Net().train()
    monitor = RoutingMonitor(net)
    assert list(monitor.layers) == ["a", "b"]
    mask = torch.rand(3, 5) > 0.3
    for step in range(3):
        net(torch.randn(3, 5, 8), mask if step == 1 else None).sum().backward()
    values = monitor.read()
    check(values, net, net.outs)
    assert values["moe/b/dropped"] > 0 and values["moe/a/loss/switch"] > 0
    # the next read covers only the forwards after the first, eval forwards included
    net.outs.clear()
    net(torch.randn(7, 8))
    with torch.no_grad():
        net.eval()(torch.randn(4, 8))
    check(monitor.read(reset=False), net, net.outs)
    check(monitor.read(), net, net.outs)
    assert monitor.read() == {}
    monitor.remove()
    net(torch.randn(4, 8))
    assert monitor.read() == {}


def test_checkpoint_recomputation_is_counted_once():
    net = Net().train()
    monitor = RoutingMonitor(net)
    calls = []
    net.b.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(6, 8, requires_grad=True)
    with set_checkpoint_early_stop(False):  # recompute the whole layer forward, hooks included
        net(x, None, True).sum().backward()
    assert len(calls) == 2 and len(net.outs) == 1  # forward and recomputation; Net's forward once
    check(monitor.read(), net, net.outs)


def test_a_bare_router_and_a_model_that_is_one_layer():
    router = moegrad.Router(dim=8, num_experts=4, top_k=2).train()
    monitor = RoutingMonitor(router)
    r = router(torch.randn(9, 8))
    values = monitor.read()
    counts = torch.bincount(r.indices.reshape(-1), minlength=4).tolist()
    mean = sum(counts) / 4
    assert values["moe/router/load_cv"] == pytest.approx(statistics.pstdev(counts) / mean)
    assert values["moe/router/max_violation"] == pytest.approx(max(counts) / mean - 1)
    assert values["moe/router/dropped"] == 0.0 and "moe/router/loss/switch" not in values
    moe = moegrad.MoE(dim=8, hidden_dim=8, num_experts=4, top_k=2)
    assert list(RoutingMonitor(moe).layers) == ["moe"]


def test_bad_models_are_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        RoutingMonitor("model")
    with pytest.raises(ValueError, match="no moegrad.MoE"):
        RoutingMonitor(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="tensorboard_dir"):
        RoutingMonitor(moegrad.MoE(dim=4, hidden_dim=4, num_experts=2, top_k=1)).write_tensorboard()


def test_bad_arguments_raise_type_errors(tmp_path, monkeypatch):
    """Nothing is created for a tensorboard_dir of the wrong type (it used to become ./123)."""
    monkeypatch.chdir(tmp_path)
    moe = moegrad.MoE(dim=4, hidden_dim=4, num_experts=2, top_k=1)
    for bad in (123, True):
        with pytest.raises(TypeError, match=f"tensorboard_dir must be .* got {type(bad).__name__}"):
            RoutingMonitor(moe, tensorboard_dir=bad)
    assert list(tmp_path.iterdir()) == []
    monitor = RoutingMonitor(moe)
    moe(torch.randn(3, 4))
    with pytest.raises(TypeError, match="reset must be True or False, got 'no'"):
        monitor.read(reset="no")
    with pytest.raises(TypeError, match="writer must be a SummaryWriter .* got str"):
        monitor.write_tensorboard("w")
    assert monitor.read()  # nothing was read and reset by the refused calls


def test_write_tensorboard_writes_the_read_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    net = Net().train()
    monitor = RoutingMonitor(net, tensorboard_dir=tmp_path)
    net(torch.randn(5, 8))
    values = monitor.write_tensorboard(step=7)
    monitor.remove()  # closes (flushes) the writer
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(values)
    for key, value in values.items():
        (event,) = events.Scalars(key)
        assert event.step == 7 and event.value == pytest.approx(value, rel=1e-6)


def test_training_and_eval_forwards_are_read_apart():
    torch.manual_seed(0)
    moe = moegrad.MoE(8, 16, 4, 2)
    monitor = RoutingMonitor(moe)
    xs = [torch.randn(12, 8) for _ in range(3)]
    counts = {True: torch.zeros(4, dtype=torch.int64), False: torch.zeros(4, dtype=torch.int64)}
    for x, training in zip(xs, (True, False, True)):
        moe.train(training)
        counts[training] += moe(x).stats.tokens_per_expert
    both = monitor.read(reset=False)
    train = monitor.read(mode="train")
    assert train["moe/moe/max_violation"] == pytest.approx(float(counts[True].max() / counts[True].float().mean() - 1))
    assert monitor.read(mode="train") == {}  # read and forgotten
    evaluation = monitor.read(mode="eval", reset=False)
    assert evaluation["moe/moe/max_violation"] == pytest.approx(
        float(counts[False].max() / counts[False].float().mean() - 1))
    total = counts[True] + counts[False]
    assert both["moe/moe/max_violation"] == pytest.approx(float(total.max() / total.float().mean() - 1))
    assert monitor.read() == evaluation  # the eval forwards were still there
    with pytest.raises(ValueError, match="mode='test' must be None"):
        monitor.read(mode="test")


class Stack(nn.Module):
    """Two MoE layers inside a model, as torch.compile(model) sees them (hooks inlined)."""

    def __init__(self):
        super().__init__()
        self.a = moegrad.MoE(dim=8, hidden_dim=12, num_experts=6, top_k=2, losses={"switch": 1e-2, "z_loss": 1e-3})
        self.b = moegrad.MoE(dim=8, hidden_dim=12, num_experts=4, top_k=1, capacity_factor=0.5)

    def forward(self, x, mask=None):
        return self.b(x + self.a(x, mask).y, mask).y


@pytest.mark.slow
def test_a_compiled_model_is_monitored_with_no_graph_break_as_in_eager(tmp_path, monkeypatch):
    """The hooks trace into torch.compile(model): no graph break, one graph per mode (no
    recompile), and the values of eager's forwards (training, eval, padding, drops, losses);
    activation checkpointing's re-run of the compiled model in backward is counted once."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    net = Stack()
    monitor = RoutingMonitor(net)
    mask = torch.arange(10) % 4 != 3
    torch._dynamo.reset()
    for training in (True, False):
        explained = torch._dynamo.explain(net.train(training))(torch.randn(10, 8, requires_grad=training), mask)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monitor.reset()
    xs = [torch.randn(10, 8) for _ in range(4)]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    compiled = torch.compile(net)
    runs = []
    for module in (net, compiled, "checkpointed"):
        net.load_state_dict(state)
        for step, x in enumerate(xs):
            net.train(step != 2)
            xx = x.clone().requires_grad_(net.training)
            if module == "checkpointed" and net.training:
                with set_checkpoint_early_stop(False):  # the whole compiled forward re-runs
                    y = checkpoint(compiled, xx, mask, use_reentrant=False)
            else:
                y = (compiled if module == "checkpointed" else module)(xx, mask)
            if net.training:
                y.square().sum().backward()
        runs.append((monitor.read(mode="train"), monitor.read(mode="eval")))
        if module is compiled:  # training and eval (checkpointing's saved-tensor hooks recompile)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    for run in runs[1:]:
        for got, want in zip(run, runs[0]):
            assert got.keys() == want.keys()
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert runs[0][0]["moe/b/dropped"] > 0


def test_sums_created_in_inference_mode_keep_counting_outside_it():
    """A loss added after the monitor was built gets its sums at its first forward; under
    torch.inference_mode() they must still be normal tensors (later in-place adds)."""
    moe = moegrad.MoE(dim=8, hidden_dim=12, num_experts=4, top_k=2, losses={"switch": 1e-2})
    monitor = RoutingMonitor(moe)
    moe.losses = {"switch": 1e-2, "z_loss": 1e-3}
    with torch.inference_mode():
        moe.train()(torch.randn(5, 8))
    out = moe(torch.randn(5, 8))
    out.y.sum().backward()
    assert monitor.read()["moe/moe/loss/z_loss"] > 0


def test_padding_with_non_finite_scores_stays_out_of_the_entropy():
    torch.manual_seed(0)
    moe = moegrad.MoE(dim=8, hidden_dim=12, num_experts=4, top_k=2, check_finite=False).eval()
    monitor = RoutingMonitor(moe)
    x, mask = torch.randn(6, 8), torch.tensor([True, True, False, True, False, True])
    x[~mask] = float("nan")
    scores = moe(x, mask).routing.scores[mask].double()
    want = float((-(scores * scores.log()).sum(-1) / math.log(4)).mean())
    assert monitor.read()["moe/moe/entropy"] == pytest.approx(want, rel=1e-9)
