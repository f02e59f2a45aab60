"""moegrad.study.flops: FLOPs per training step counted from what was evaluated, checked
against torch's own FlopCounterMode (an independent count of every matrix product the step
ran) and against hand counts."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moegrad import estimators
from moegrad.study.flops import moe_flops, step_flops
from moegrad.study.tasks import Clusters, get_task


def _counted_step(task, estimator):
    """(our count, FlopCounterMode's count) of one training step on the loop backend."""
    task.impl = "loop"  # one mm per expert: every evaluated row counted, no padding
    model = task.build(estimator, {}, {}, 0)
    batch = task.batch(0)
    with FlopCounterMode(display=False) as counter:
        loss, aux, outs = task.loss(model, batch)
        (loss + aux).backward()
    return step_flops(task, model, batch, outs), counter.get_total_flops()


@pytest.mark.filterwarnings("ignore:estimator=.* gives the router no task gradient")
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("estimator", estimators.available())
def test_clusters_step_flops_equal_torch_flop_counter(estimator, top_k):
    ours, torch_count = _counted_step(Clusters(0, batch_size=64, top_k=top_k), estimator)
    assert ours["total"] == torch_count
    assert ours["backbone"] == 0


@pytest.mark.filterwarnings("ignore:estimator=.* gives the router no task gradient")
@pytest.mark.parametrize("estimator", ["topk", "dense", "noisy_topk", "default_moe"])
def test_charlm_step_flops_equal_torch_flop_counter_plus_attention(estimator):
    """Inside a network the MoE input carries a gradient (experts' and router's input
    gradients are computed). FlopCounterMode does not see CPU flash attention, so the
    attention products are added by hand: 2 per layer (QK^T, PV), B S S D multiply-adds each,
    forward + 2x backward."""
    task = get_task("charlm")(0, dim=16, heads=2, layers=2, context=8, num_experts=4,
                              hidden_dim=24, batch_size=2, val_batches=1)
    ours, torch_count = _counted_step(task, estimator)
    b, s, d = 2, 8, 16
    attention = task.layers * 2 * (2 * b * s * s * d) * 3
    assert ours["total"] == torch_count + attention


def test_dense_exceeds_topk_by_exactly_the_unselected_pairs():
    """Hand count, T = 64 tokens, D = 16, H = 32, E = 8, K = 1, SwiGLU, data input:
    experts 2 * D H N * (3 forward + 3 weight grads + 1 activation grad) with N = T K = 64;
    router 2 * T D E * 2; combine (K = 1) the weight gradient only, 2 T K D;
    dense adds the T (E - K) = 448 unselected pairs, 2 * 3 D H each."""
    task = Clusters(0, batch_size=64)
    topk, _ = _counted_step(task, "topk")
    dense, _ = _counted_step(task, "dense")
    d, h, e, t = 16, 32, 8, 64
    assert topk["experts"] == 2 * d * h * t * 7 == 458752
    assert topk["router"] == 2 * t * d * e * 2 == 32768
    assert topk["combine"] == 2 * t * d == 2048
    assert topk["total"] == 458752 + 32768 + 2048
    assert dense["unselected"] == 448 * 2 * 3 * d * h == 1376256
    assert dense["total"] - topk["total"] == 1376256
    assert {k: v for k, v in dense.items() if k not in ("unselected", "total")} == \
        {k: v for k, v in topk.items() if k not in ("unselected", "total")}


def test_moe_flops_gelu_and_input_grad():
    """GELU experts (m = 2 matrices) with an input that carries a gradient, K = 2, T = 10:
    experts 2 D H N (2 + 2 + 1 + 1), N = 20; router 3 products; combine forward and weight
    gradient; dense's unselected pairs 2 * 2 D H each."""
    import moegrad

    torch.manual_seed(0)
    moe = moegrad.MoE(6, 5, 4, 2, estimator="dense", activation="gelu", losses={}, impl="loop")
    x = torch.randn(10, 6, requires_grad=True)
    out = moe(x)
    with FlopCounterMode(display=False) as counter:
        out = moe(x)
        out.y.square().sum().backward()
    got = moe_flops(moe, out, input_grad=True)
    assert got["experts"] == 2 * 6 * 5 * 20 * 6
    assert got["router"] == 2 * 10 * 6 * 4 * 3
    assert got["combine"] == 2 * 10 * 2 * 6 * 2
    assert got["unselected"] == 10 * 2 * 2 * 2 * 6 * 5
    assert sum(got.values()) == counter.get_total_flops()
