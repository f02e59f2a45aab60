"""ReMoE (routing="remoe"): ReLU gates, the load-balanced L1 penalty and its adaptive
coefficient, against a dense reference written out here."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

import moegrad
from moegrad.remoe import remoe_l1_loss, update_l1_coefficient


def _dense_reference(moe, x, mask=None, coefficient=None):
    """Every expert on every token, weighted by its ReLU gate (zero gates add nothing):
    g = r * relu(x W^T / tau) [T, E] (0 on padding), y_t = sum_e g_te E_e(x_t),
    f_e = E / (K T_r) * #{t: g_te > 0} (no gradient), aux = lambda * (1 / T_r) sum f_e g_te."""
    c = moe.router.config
    w = moe.experts.stacked_weights()
    gates = c.routed_scaling_factor * torch.relu(x @ moe.router.gate.weight.T / c.temperature)
    if mask is not None:
        gates = gates * mask[:, None].to(gates.dtype)
    y = torch.zeros_like(x)
    for e in range(c.num_experts):
        out = (F.silu(x @ w.gate[e].T) * (x @ w.up[e].T)) @ w.down[e].T  # SwiGLU expert e, all tokens
        y = y + gates[:, e:e + 1] * out
    real = x.shape[0] if mask is None else int(mask.sum())
    load = (gates > 0).sum(0).to(gates.dtype).detach() * c.num_experts / (c.top_k * real)
    l1 = (gates * load).sum() / real
    lam = moe.router.l1_coefficient if coefficient is None else coefficient
    return y, lam * l1, l1, gates


@pytest.mark.parametrize("masked,temperature,scale", [(False, 1.0, 1.0), (True, 0.7, 2.5)])
def test_remoe_output_and_gradients_equal_the_dense_reference(masked, temperature, scale):
    torch.manual_seed(0)
    moe = moegrad.MoE(6, 10, 5, 2, routing="remoe", temperature=temperature,
                      routed_scaling_factor=scale, l1_init=0.3).double()
    x = torch.randn(17, 6, dtype=torch.float64)
    mask = (torch.arange(17) % 4 != 3) if masked else None
    target = torch.randn(17, 6, dtype=torch.float64)
    grads = []
    for run in ("layer", "reference"):
        moe.zero_grad()
        xx = x.clone().requires_grad_()
        if run == "layer":
            out = moe(xx, mask)
            y, aux = out.y, out.aux_loss
            lam_before = 0.3
        else:
            y, aux, l1, gates = _dense_reference(moe, xx, mask, coefficient=torch.tensor(lam_before))
        ((y * target).sum() + aux).backward()
        grads.append((y.detach(), aux.detach(), xx.grad, [p.grad.clone() for p in moe.parameters()]))
        if run == "layer":
            layer_out = out
    (y0, a0, gx0, gp0), (y1, a1, gx1, gp1) = grads
    torch.testing.assert_close(y0, y1)
    torch.testing.assert_close(a0, a1)
    torch.testing.assert_close(gx0, gx1)
    for u, v in zip(gp0, gp1):
        torch.testing.assert_close(u, v)
    assert float(gp0[0].abs().sum()) > 0  # the router learns from the task and the penalty
    active = gates.detach() > 0
    assert torch.equal(layer_out.routing.chosen, active)
    torch.testing.assert_close(layer_out.losses["remoe_l1"].detach(), l1.detach())
    # variable experts per token, through the same dispatch
    per_token = active.sum(1)
    assert int(per_token.max()) > int(per_token.min())
    assert torch.equal(layer_out.stats.tokens_per_expert, active.sum(0))
    none = ~active.any(1) if mask is None else ~active.any(1) & mask
    assert int(layer_out.stats.unrouted_tokens) == int(none.sum())
    assert int(layer_out.stats.dropped) == 0


def test_remoe_gate_gradient_passes_gradcheck():
    """The layer's loss as a function of the gate weight (fixed active set near no kink)."""
    torch.manual_seed(1)
    moe = moegrad.MoE(4, 6, 4, 2, routing="remoe", l1_init=0.5).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    target = torch.randn(9, 4, dtype=torch.float64)
    moe.eval()  # no coefficient update between gradcheck's evaluations
    logits = (x @ moe.router.gate.weight.T).detach()
    assert float(logits.abs().min()) > 1e-3  # gradcheck's 1e-6 steps stay on one side of every kink

    def loss(weight):
        out = torch.func.functional_call(moe, {"router.gate.weight": weight}, (x,))
        return (out.y * target).sum() + out.aux_loss

    assert torch.autograd.gradcheck(loss, (moe.router.gate.weight.detach().clone().requires_grad_(),))


def test_l1_coefficient_update_rule():
    """lambda * alpha ** sign(a - K), a the mean active experts per real token."""
    from moegrad.routing import Routing

    def routing(chosen, mask=None):
        chosen = torch.tensor(chosen, dtype=torch.bool)
        t, e = chosen.shape
        return Routing(logits=torch.zeros(t, e), scores=chosen.float(),
                       indices=torch.arange(e).expand(t, e), weights=chosen.float(), shape=(t,),
                       mask=None if mask is None else torch.tensor(mask), chosen=chosen)

    lam = torch.tensor(1.0)
    update_l1_coefficient(lam, routing([[1, 1, 1, 0], [1, 1, 1, 1]]), 2, 1.5)  # a = 3.5 > 2
    assert float(lam) == pytest.approx(1.5)
    update_l1_coefficient(lam, routing([[1, 0, 0, 0], [0, 1, 0, 0]]), 2, 1.5)  # a = 1 < 2
    assert float(lam) == pytest.approx(1.0)
    update_l1_coefficient(lam, routing([[1, 1, 0, 0], [0, 1, 1, 0]]), 2, 1.5)  # a = 2: unchanged
    assert float(lam) == pytest.approx(1.0)
    # padding rows do not count: the real token has 1 expert < 2
    update_l1_coefficient(lam, routing([[1, 0, 0, 0], [0, 0, 0, 0]], mask=[True, False]), 2, 2.0)
    assert float(lam) == pytest.approx(0.5)
    update_l1_coefficient(lam, routing([[0, 0, 0, 0]], mask=[False]), 2, 2.0)  # no real token
    assert float(lam) == pytest.approx(0.5)
    # the penalty: f = E / (K T_r) * counts = 4 / (2 * 2) * [1, 1, 1, 0]; L1 = sum f g / T_r
    r = routing([[1, 1, 0, 0], [0, 1, 1, 0]])
    r.weights = torch.tensor([[0.5, 2.0, 0.0, 0.0], [0.0, 1.0, 3.0, 0.0]])
    f = torch.tensor([1.0, 2.0, 1.0, 0.0]) * 4 / (2 * 2)
    assert float(remoe_l1_loss(r, 2)) == pytest.approx(float((r.weights * f).sum() / 2))


def test_coefficient_moves_in_training_only_and_not_in_checkpoint_recomputation():
    torch.manual_seed(0)
    moe = moegrad.MoE(8, 16, 8, 1, routing="remoe", l1_alpha=2.0)  # E/2 active at init, > K = 1
    x = torch.randn(32, 8)
    moe.eval()
    moe(x)
    assert float(moe.router.l1_coefficient) == pytest.approx(1e-8)
    moe.train()
    out = torch.utils.checkpoint.checkpoint(lambda v: moe(v).y, x.requires_grad_(), use_reentrant=False)
    out.sum().backward()  # the recomputation in backward does not update it a second time
    assert float(moe.router.l1_coefficient) == pytest.approx(2e-8)
    assert float(moe.state_dict()["router.l1_coefficient"]) == pytest.approx(2e-8)
    # the penalty's gradient under checkpointing is the one without it (the re-run takes the
    # forward's lambda, not the updated one)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(3)
        layer = moegrad.MoE(8, 16, 8, 1, routing="remoe", l1_init=0.5)
        xx = torch.randn(32, 8, requires_grad=True)
        if checkpointed:
            aux = torch.utils.checkpoint.checkpoint(lambda v: layer(v).aux_loss, xx, use_reentrant=False)
        else:
            aux = layer(xx).aux_loss
        aux.backward()
        grads.append((float(aux), layer.router.gate.weight.grad.clone(), xx.grad.clone(),
                      float(layer.router.l1_coefficient)))
    assert grads[0][0] == pytest.approx(grads[1][0]) and grads[0][3] == pytest.approx(grads[1][3])
    torch.testing.assert_close(grads[1][1], grads[0][1])
    torch.testing.assert_close(grads[1][2], grads[0][2])
    # over many steps, and with an alpha whose factors do not round-trip in fp32, bit for bit
    layers, steps = [], []
    for checkpointed in (False, True):
        torch.manual_seed(4)
        layer = moegrad.MoE(8, 16, 8, 2, routing="remoe", l1_init=0.3, l1_alpha=1.25)
        opt = torch.optim.SGD(layer.parameters(), lr=0.05)
        data = torch.Generator().manual_seed(5)
        grads_here = []
        for _ in range(25):
            xx = torch.randn(24, 8, generator=data) + 0.5
            run = lambda v: (lambda o: o.y.square().mean() + o.aux_loss)(layer(v))
            loss = torch.utils.checkpoint.checkpoint(run, xx, use_reentrant=False) if checkpointed else run(xx)
            opt.zero_grad()
            loss.backward()
            grads_here.append(layer.router.gate.weight.grad.clone())
            opt.step()
        layers.append(float(layer.router.l1_coefficient))
        steps.append(grads_here)
    assert layers[0] == layers[1]
    assert all(torch.equal(a, b) for a, b in zip(*steps))
    moe.to(torch.bfloat16)  # the coefficient stays fp32 (as the selection bias does)
    assert moe.router.l1_coefficient.dtype == torch.float32
    assert float(moe.router.l1_coefficient) == pytest.approx(2e-8)


def test_adaptive_coefficient_drives_mean_active_experts_to_top_k():
    """A small regression task on clustered inputs (a gate without bias can only sparsify
    inputs that are not symmetric about 0): after 100 steps the mean number of active experts
    per token over the next 100 is within 10% of K = 2 (it starts near E / 2 = 4).
    l1_alpha=1.05 and l1_init=1e-2 (not the paper's 1.2 and 1e-8, tuned for long LM runs):
    the paper's values overshoot on a run this short, see docs/which-estimator.md."""
    torch.manual_seed(0)
    dim, experts, k = 16, 8, 2
    moe = moegrad.MoE(dim, 2 * dim, experts, k, routing="remoe", l1_init=1e-2, l1_alpha=1.05)
    a, b = torch.randn(dim, 2 * dim) / dim ** 0.5, torch.randn(2 * dim, dim) / (2 * dim) ** 0.5
    centers = torch.randn(8, dim)
    opt = torch.optim.Adam(moe.parameters(), lr=3e-3)
    active = []
    for _ in range(200):
        x = 0.5 * torch.randn(64, dim) + centers[torch.randint(0, 8, (64,))]
        out = moe(x)
        loss = (out.y - torch.tanh(x @ a) @ b).square().mean() + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        active.append(float(out.stats.tokens_per_expert.sum()) / 64)
    assert statistics.mean(active[:10]) > 3.0  # it did start dense
    assert abs(statistics.mean(active[100:]) - k) <= 0.1 * k, statistics.mean(active[100:])


def test_remoe_defaults_and_what_it_refuses():
    moe = moegrad.MoE(8, 16, 4, 2, routing="remoe")
    assert moe.losses == {} and "routing=remoe" in repr(moe) and "estimator=" not in repr(moe.router)
    assert moe.router.config.score == "relu" and moe.capacity_factor is None
    assert moegrad.MoE(8, 16, 4, 2, routing="remoe", losses={"z_loss": 1e-3}).losses == {"z_loss": 1e-3}
    import torch.distributed as dist

    from moegrad._testing import free_port, init_process_group_for_tests
    from moegrad.distributed import expert_parallel

    init_process_group_for_tests(0, 1, free_port(), 20.0)
    try:
        with pytest.raises(ValueError, match="routing='remoe' is not supported under expert parallelism"):
            expert_parallel(moe)
    finally:
        dist.destroy_process_group()


def test_remoe_sparsity_example_runs_briefly():
    import runpy
    from pathlib import Path

    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "remoe_sparsity.py"))
    summary = example["main"](["--steps", "8", "--seeds", "2", "--alpha", "1.5", "--init", "1e-3"])
    assert set(summary) == {"topk", "remoe l1_alpha=1.5"}
    active, _ = example["run"]("remoe", 1, 8, 1.5, 1e-3)
    remoe = summary["remoe l1_alpha=1.5"]
    assert remoe["active"]["values"][1] == pytest.approx(statistics.mean(active[-2:]))
    assert remoe["active"]["n"] == 2 and 0 < remoe["active"]["mean"] <= 8
    assert remoe["loss_minus_topk"]["n"] == 2
