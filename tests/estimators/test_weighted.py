"""topk, unweighted and straight_through: router gradients against hand computations."""

import pytest
import torch

import moegrad
from tests.conftest import every_expert_ref, expert_ref


def _layer(estimator, **kw):
    torch.manual_seed(1)
    kw.setdefault("losses", {})
    return moegrad.MoE(6, 10, 5, kw.pop("top_k", 2), estimator=estimator, **kw).double()


def _x(t=7, d=6):
    return torch.randn(t, d, dtype=torch.float64)


def _router_grad_by_hand(moe, x, g, dscore_fn):
    """dL/dW_gate from dL/ds [T, E] given by dscore_fn(scores, indices, experts_out)."""
    with torch.no_grad():
        z = x @ moe.router.gate.weight.T
        s = torch.softmax(z, -1)
        idx = s.topk(moe.top_k, -1).indices
        outs = every_expert_ref(x, moe)
        ds = dscore_fn(s, idx, outs, g)
        dz = s * (ds - (ds * s).sum(-1, keepdim=True))  # softmax backward
        return dz.T @ x


def _run(moe, x, g):
    moe.zero_grad()
    out = moe(x)
    (out.y * g).sum().backward()
    return out


def test_topk_router_gradient_is_selected_inner_products():
    moe, x = _layer("topk"), _x()
    g = torch.randn_like(x)
    _run(moe, x, g)

    def ds(s, idx, outs, g):
        d = torch.zeros_like(s)
        inner = torch.einsum("ted,td->te", outs, g)
        return d.scatter(1, idx, inner.gather(1, idx))

    torch.testing.assert_close(moe.router.gate.weight.grad, _router_grad_by_hand(moe, x, g, ds))


def test_topk_top1_normalized_gives_zero_router_task_gradient():
    """w = s/s is the constant 1: the gradient is zero up to fp32 rounding of s/s."""
    moe, x = _layer("topk", top_k=1, normalize=True), _x()
    g = torch.randn_like(x)
    _run(moe, x, g)
    topk_grad = moe.router.gate.weight.grad.norm()
    st = _layer("straight_through", top_k=1, normalize=True)
    _run(st, x, g)
    assert topk_grad < 1e-6 * st.router.gate.weight.grad.norm()
    assert moe.experts.w1.grad.abs().sum() > 0


def test_unweighted_forward_is_plain_sum_and_router_gets_nothing():
    moe, x = _layer("unweighted"), _x()
    out = _run(moe, x, torch.randn_like(x))
    ref = torch.stack([sum(expert_ref(x[t:t + 1], moe, int(e))[0] for e in out.routing.indices[t])
                       for t in range(x.shape[0])])
    torch.testing.assert_close(out.y, ref)
    assert moe.router.gate.weight.grad is None or torch.count_nonzero(moe.router.gate.weight.grad) == 0


@pytest.mark.parametrize("normalize", [False, True])
def test_straight_through_equals_y_times_one_plus_s_minus_sg_s(normalize):
    moe, x = _layer("straight_through", normalize=normalize), _x()
    g = torch.randn_like(x)
    out = _run(moe, x, g)
    # forward: unit weights
    torch.testing.assert_close(out.routing.weights.detach(), torch.ones(7, 2, dtype=torch.float64))
    # reference: y_j = E_j(x) * (1 + s - sg(s)) summed over the selected j, written with autograd
    ref_gate = moe.router.gate.weight.detach().clone().requires_grad_(True)
    s = torch.softmax(x @ ref_gate.T, -1)
    idx = out.routing.indices
    y = 0
    for j in range(2):
        sj = s.gather(1, idx[:, j:j + 1])
        ej = torch.stack([expert_ref(x[t:t + 1], moe, int(idx[t, j]))[0] for t in range(7)]).detach()
        y = y + ej * (1 + sj - sj.detach())
    torch.testing.assert_close(out.y, y)
    (y * g).sum().backward()
    torch.testing.assert_close(moe.router.gate.weight.grad, ref_gate.grad)


def test_mlx_issue_652_sign_bug_is_not_reproduced():
    """ml-explore/mlx#652's ``gw - sg(gw + 1)`` has value -1: our straight-through keeps the output sign."""
    moe, x = _layer("straight_through", top_k=1), _x()
    ref = _layer("unweighted", top_k=1)
    ref.load_state_dict(moe.state_dict())
    torch.testing.assert_close(moe(x).y, ref(x).y)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_topk_weights_gradcheck_float64(score):
    """Away from ties the selection is locally constant, so topk's weights are smooth in z.
    (straight_through is deliberately not the true derivative: it is checked above instead.)"""
    router = moegrad.Router(4, 5, 3, score=score, normalize=True, routed_scaling_factor=1.5)
    x = torch.randn(3, 4, dtype=torch.float64)
    z0 = torch.randn(3, 5, dtype=torch.float64)

    def f(z):
        return router.estimator.route(x, z, router.score(z), router).weights

    assert torch.autograd.gradcheck(f, (z0.requires_grad_(True),))
