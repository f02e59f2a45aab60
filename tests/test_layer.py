"""The MoE layer against per-token references."""

import pytest
import torch
import torch.nn.functional as F

import moegrad
from tests.conftest import capacity_keep_ref, moe_loop_ref

ALL = moegrad.estimators.available()
STOCHASTIC = ("gumbel", "noisy_topk", "sparsemixer")
#: estimators whose output is exactly the weighted sum of the selected experts
SPARSE_SUM = [e for e in ALL if e not in ("dense", "default_moe")]


def _moe(estimator="topk", seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    kw.setdefault("losses", {})
    if estimator in STOCHASTIC:
        kw.setdefault("generator", torch.Generator().manual_seed(seed))
    return moegrad.MoE(kw.pop("dim", 6), kw.pop("hidden_dim", 10), kw.pop("num_experts", 5),
                       kw.pop("top_k", 2), estimator=estimator, **kw).to(dtype)


def test_one_expert_top1_equals_dense_swiglu_ffn():
    moe = _moe(num_experts=1, top_k=1)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    w1, w3, w2 = (p.detach().clone()[0].requires_grad_(True) for p in (moe.experts.w1, moe.experts.w3, moe.experts.w2))
    x_ref = x.detach().clone().requires_grad_(True)
    ref = (F.silu(x_ref @ w1.T) * (x_ref @ w3.T)) @ w2.T
    torch.testing.assert_close(out.y, ref)
    g = torch.randn_like(ref)
    (out.y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(moe.experts.w1.grad[0], w1.grad)
    torch.testing.assert_close(moe.experts.w3.grad[0], w3.grad)
    torch.testing.assert_close(moe.experts.w2.grad[0], w2.grad)


def test_gelu_experts():
    moe = _moe(activation="gelu", num_experts=1, top_k=1)
    assert moe.experts.w3 is None
    x = torch.randn(5, 6, dtype=torch.float64)
    ref = F.gelu(x @ moe.experts.w1[0].T) @ moe.experts.w2[0].T
    torch.testing.assert_close(moe(x).y, ref)


@pytest.mark.parametrize("estimator", SPARSE_SUM)
@pytest.mark.parametrize("normalize", [False, True])
def test_layer_equals_per_token_loop_in_output_and_gradients(estimator, normalize):
    moe = _moe(estimator, normalize=normalize, top_k=3).train()
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    g = torch.randn_like(x)
    (out.y * g).sum().backward(retain_graph=True)
    grads = [x.grad.clone()] + [p.grad.clone() for p in moe.parameters() if p.grad is not None]
    moe.zero_grad()
    x.grad = None
    ref = moe_loop_ref(x, moe, out.routing)
    torch.testing.assert_close(out.y, ref)
    (ref * g).sum().backward()
    ref_grads = [x.grad] + [p.grad for p in moe.parameters() if p.grad is not None]
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("estimator", ALL)
def test_eval_mode_is_deterministic_topk_and_training_is_reproducible(estimator):
    x = torch.randn(16, 6, dtype=torch.float64)
    moe = _moe(estimator, seed=1).eval()
    a, b = moe(x), moe(x)
    torch.testing.assert_close(a.y, b.y, rtol=0, atol=0)
    assert torch.equal(a.routing.indices, a.routing.scores.topk(2, -1).indices)
    train_a = _moe(estimator, seed=2).train()(x)
    train_b = _moe(estimator, seed=2).train()(x)
    torch.testing.assert_close(train_a.y, train_b.y, rtol=0, atol=0)


def test_zero_tokens_give_an_empty_output_of_the_right_shape():
    moe = _moe(losses={"switch": 1.0, "z_loss": 1.0})
    x = torch.zeros(0, 6, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    assert out.y.shape == (0, 6) and float(out.aux_loss) == 0.0
    assert out.stats.tokens_per_expert.tolist() == [0] * 5 and int(out.stats.dropped) == 0
    out.y.sum().backward()
    out3 = moe(torch.zeros(2, 0, 6, dtype=torch.float64))
    assert out3.y.shape == (2, 0, 6)


@pytest.mark.parametrize("shape", [(0, 6), (0, 3, 6), (2, 0, 6)])
@pytest.mark.parametrize("estimator", ["topk", "dense", "default_moe", "noisy_topk"])
def test_zero_tokens_with_every_loss(shape, estimator):
    losses = {"switch": 1.0, "z_loss": 1.0, "seq_aux": 1.0}
    if estimator == "noisy_topk":
        losses["importance_load"] = 1.0
    moe = _moe(estimator=estimator, losses=losses).train()
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    assert out.y.shape == shape and float(out.aux_loss.detach()) == 0.0
    (out.y.sum() + out.aux_loss).backward()
    assert x.grad.shape == shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", ["topk", "straight_through", "dense", "default_moe", "gumbel",
                                       "noisy_topk", "sparsemixer", "unweighted"])
def test_low_precision_training_step_with_every_estimator(dtype, estimator):
    moe = _moe(estimator=estimator, dtype=dtype).train()
    x = torch.randn(2, 5, 6).to(dtype).requires_grad_()
    for _ in range(2):  # the second step reads default_moe's buffers written by the first
        out = moe(x)
        (out.y.float().square().sum() + out.aux_loss).backward()
    assert out.y.dtype == dtype and x.grad.dtype == dtype
    gate_grad = moe.router.gate.weight.grad
    if estimator == "unweighted":  # the control: no router task gradient at all
        assert gate_grad is None
    else:  # (sparsemixer's mask keeps only the pick at this init: its gradient may be 0)
        assert torch.isfinite(gate_grad).all()
        assert estimator == "sparsemixer" or gate_grad.abs().sum() > 0
    if estimator == "default_moe":
        assert moe.router.estimator.defaults.dtype == dtype
        assert bool(moe.router.estimator.seen.any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_keeps_its_dtype_with_fp32_routing(dtype):
    moe = _moe(dtype=dtype)
    x = torch.randn(2, 3, 6).to(dtype)
    out = moe(x)
    assert out.y.dtype == dtype and out.y.shape == x.shape
    assert out.routing.logits.dtype == torch.float32 and out.routing.weights.dtype == torch.float32
    assert out.aux_loss.dtype == torch.float32
    ref = _moe(dtype=torch.float32)(x.float()).y
    torch.testing.assert_close(out.y.float(), ref, rtol=0.05, atol=0.02)


def test_stats_count_every_pair_and_capacity_drops_lowest_weights():
    moe = _moe(top_k=2, num_experts=4)
    x = torch.randn(10, 6, dtype=torch.float64)
    out = moe(x)
    assert int(out.stats.tokens_per_expert.sum()) == 20 and int(out.stats.dropped) == 0
    routed = torch.bincount(out.routing.indices.reshape(-1), minlength=4)
    assert torch.equal(out.stats.tokens_per_expert, routed)

    capped = _moe(top_k=2, num_experts=4, capacity_factor=0.5)  # capacity ceil(0.5*10*2/4) = 3
    res = capped(x)
    assert int(res.stats.dropped) == int((routed - 3).clamp(min=0).sum())
    # reference: keep each expert's 3 highest-weight pairs
    keep = capacity_keep_ref(res.routing.indices, res.routing.weights, 4, 3)
    kept = moegrad.Routing(res.routing.logits, res.routing.scores, res.routing.indices,
                           res.routing.weights * keep, res.routing.shape)
    torch.testing.assert_close(res.y, moe_loop_ref(x, capped, kept))


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="hidden_dim=0"):
        moegrad.MoE(8, 0, 4, 2)
    with pytest.raises(ValueError, match="activation='relu'.*gelu.*swiglu"):
        moegrad.MoE(8, 8, 4, 2, activation="relu")
    with pytest.raises(ValueError, match="capacity_factor=0"):
        moegrad.MoE(8, 8, 4, 2, capacity_factor=0)
    with pytest.raises(ValueError, match="impl='cuda'"):
        moegrad.MoE(8, 8, 4, 2, impl="cuda")
    with pytest.raises(ValueError, match="top_k=5 is out of range; it must be in 1..4"):
        moegrad.MoE(8, 8, 4, 5)
    moe = moegrad.MoE(8, 8, 4, 2)
    with pytest.raises(ValueError, match="feature size 6"):
        moe(torch.randn(3, 6))
    with pytest.raises(ValueError, match="mask has shape"):
        moe(torch.randn(2, 3, 8), mask=torch.ones(3, 2, dtype=torch.bool))


def test_training_reduces_loss_for_every_estimator():
    """A short fit of a teacher MoE: every estimator trains (the loss falls by half)."""
    torch.manual_seed(0)
    teacher = moegrad.MoE(8, 16, 4, 2).eval()
    x = torch.randn(256, 8)
    with torch.no_grad():
        target = teacher(x).y
    for name in ALL:
        torch.manual_seed(1)
        extra = {"losses": {"importance_load": 1e-2}} if name == "noisy_topk" else {}
        student = moegrad.MoE(8, 16, 4, 2, estimator=name, **extra)
        opt = torch.optim.Adam(student.parameters(), lr=3e-3)
        first = None
        for _ in range(60):
            out = student(x)
            loss = F.mse_loss(out.y, target)
            first = loss.item() if first is None else first
            opt.zero_grad()
            (loss + out.aux_loss).backward()
            opt.step()
        assert loss.item() < 0.5 * first, (name, first, loss.item())


@pytest.mark.parametrize("estimator, opts", [("topk", {"normalize": True}),
                                              ("default_moe", {"forward_defaults": True})])
def test_layer_gradcheck_float64(estimator, opts):
    """Away from ties the selection is locally constant: the layer is smooth in x and the gate."""
    moe = _moe(estimator, top_k=2, **opts).eval()
    if estimator == "default_moe":
        moe.router.estimator.defaults.normal_()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    gate = moe.router.gate.weight

    assert torch.autograd.gradcheck(lambda x: moe(x).y, (x,))
    w = gate.detach().clone().requires_grad_(True)
    out = moe(x)
    # the gate enters only through the weights: compare autograd with central differences
    g = torch.randn_like(out.y)
    (out.y * g).sum().backward()
    num = torch.zeros_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            for sign in (1, -1):
                with torch.no_grad():
                    gate.copy_(w)
                    gate[i, j] += sign * 1e-6
                num[i, j] += sign * (moe(x).y * g).sum() / 2e-6
    with torch.no_grad():
        gate.copy_(w)
    torch.testing.assert_close(gate.grad, num, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("estimator", ["topk", "dense", "default_moe", "noisy_topk", "sparsemixer"])
def test_autocast_bfloat16_trains_with_fp32_routing(estimator):
    """Under torch.autocast the experts run in bf16, the router stays fp32, and backward works
    (the hand-written expert backward sees one dtype)."""
    moe = _moe(estimator=estimator, dtype=torch.float32).train()
    x = torch.randn(3, 7, 6, requires_grad=True)
    ref = _moe(estimator=estimator, dtype=torch.float32).train()
    ref.load_state_dict(moe.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
    assert out.routing.logits.dtype == torch.float32 and out.routing.weights.dtype == torch.float32
    assert out.y.dtype == torch.bfloat16
    out.y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and moe.experts.w1.grad.dtype == torch.float32
    want = ref(x.detach().clone()).y
    if estimator not in STOCHASTIC:  # same routing: the bf16 output is close to the fp32 one
        assert torch.equal(out.routing.indices, ref(x.detach()).routing.indices)
        torch.testing.assert_close(out.y.float(), want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("capacity_factor", [None, 0.6])
@pytest.mark.parametrize("estimator", ["topk", "dense", "default_moe"])
def test_padding_is_not_dispatched_and_matches_the_real_tokens_alone(estimator, capacity_factor):
    """With a mask, the real tokens get exactly what a call on the real tokens alone gives
    (outputs, stats, capacity, gradients); padding outputs 0 and takes no capacity."""
    mask = torch.tensor([[True, True, True, False, False], [True, True, False, False, False]])
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    padded = _moe(estimator, losses={"switch": 0.1}, capacity_factor=capacity_factor).train()
    alone = _moe(estimator, losses={"switch": 0.1}, capacity_factor=capacity_factor).train()
    xp, xa = x.clone().requires_grad_(), x[mask].clone().requires_grad_()
    out_p, out_a = padded(xp, mask=mask), alone(xa)
    torch.testing.assert_close(out_p.y[mask], out_a.y)
    assert torch.equal(out_p.y[~mask], torch.zeros_like(out_p.y[~mask]))
    assert torch.equal(out_p.stats.tokens_per_expert, out_a.stats.tokens_per_expert)
    assert int(out_p.stats.tokens_per_expert.sum()) == 5 * 2  # real tokens x K
    assert int(out_p.stats.dropped) == int(out_a.stats.dropped)
    if capacity_factor is not None:
        assert int(out_a.stats.dropped) > 0
    torch.testing.assert_close(out_p.aux_loss, out_a.aux_loss)
    ((out_p.y[mask] * out_a.y.detach()).sum() + out_p.aux_loss).backward()
    ((out_a.y * out_a.y.detach()).sum() + out_a.aux_loss).backward()
    torch.testing.assert_close(xp.grad[mask], xa.grad)
    assert torch.equal(xp.grad[~mask], torch.zeros_like(xp.grad[~mask]))
    for (name, p), q in zip(padded.named_parameters(), alone.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_updates_running_state_once(reentrant):
    """Checkpointing re-runs the forward in backward: outputs, gradients, load counts, the
    default_moe EMA and a BalanceWindow must equal a run without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(2, 7, 6, dtype=torch.float64)
    runs = []
    for use_checkpoint in (False, True):
        moe = _moe("default_moe", losses={"switch": 0.1}).train()
        window = moegrad.BalanceWindow(moe)
        for _ in range(2):  # the second step reads the EMA the first one wrote
            xx = x.clone().requires_grad_()
            if use_checkpoint:
                y, aux = checkpoint(lambda v: (lambda o: (o.y, o.aux_loss))(moe(v)), xx,
                                    use_reentrant=reentrant)
            else:
                out = moe(xx)
                y, aux = out.y, out.aux_loss
            (y.square().sum() + aux).backward()
        runs.append((y.detach(), xx.grad, moe.router.gate.weight.grad, moe.router.load_counts.clone(),
                     moe.router.estimator.defaults.clone(), window.fractions()[0]))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)


def test_checkpointing_refuses_a_sampling_generator():
    from torch.utils.checkpoint import checkpoint

    moe = _moe("gumbel").train()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y = checkpoint(lambda v: moe(v).y, x, use_reentrant=False)
    with pytest.raises(RuntimeError, match="generator= cannot run under activation checkpointing"):
        y.sum().backward()
