"""Balancing state across layer calls (moegrad.balancing): BalanceWindow, BiasBalancer,
QuantileBalancer."""

import json
import math
import os

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moegrad
from moegrad import losses
from moegrad._spec import histogram_quantile
from moegrad.balancing import BalanceWindow, BiasBalancer, QuantileBalancer
from moegrad.diagnostics import max_violation
from tests.conftest import one_torch_thread


def test_bias_balancer_moves_bias_towards_balance_and_keeps_weights():
    moe = moegrad.MoE(4, 8, 4, 1, selection_bias=True, losses={})
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0] = 1.0  # expert 0 wins for x with positive sum
    x = torch.rand(32, 4) + 0.1
    balancer = BiasBalancer(moe, gamma=0.5)
    moe.train()
    moe(x)
    loads = balancer.step()
    assert loads[0].tolist() == [32.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(moe.router.bias, torch.tensor([-0.5, 0.5, 0.5, 0.5]))
    assert int(moe.router.load_counts.sum()) == 0
    moe(x)
    out = moe.router(x)
    # the bias moved tokens off expert 0, weights are still the plain scores of the chosen expert
    assert float((out.indices == 0).float().mean()) < 1.0
    torch.testing.assert_close(out.weights[:, 0], out.scores.gather(1, out.indices)[:, 0])


def test_bias_balancer_needs_a_biased_router():
    with pytest.raises(ValueError, match="selection_bias=True"):
        BiasBalancer(moegrad.MoE(4, 8, 4, 1))


def _window_reference(indices, masks, scores, num_experts):
    """E * sum_i f_i P_i with f from every micro-batch so far (``indices``/``masks`` lists) and
    P from the last one (``scores`` [T, E] of the last micro-batch), written out."""
    idx = torch.cat(indices)  # [sum T, K]
    real = torch.cat(masks)  # [sum T]
    onehot = torch.nn.functional.one_hot(idx, num_experts).sum(1).float()  # [sum T, E]
    f = onehot[real].sum(0) / real.sum()
    last = masks[-1]
    p = (scores / scores.sum(-1, keepdim=True))[last].mean(0)
    return num_experts * (f * p).sum(), f


def test_balance_window_accumulates_f_over_micro_batches():
    torch.manual_seed(3)
    e = 6
    moe = moegrad.MoE(5, 8, e, 2, losses={"switch": 1.0, "z_loss": 0.5})
    window = BalanceWindow(moe)
    gen = torch.Generator().manual_seed(0)
    indices, masks = [], []
    for m, tokens in enumerate((7, 4, 9)):  # micro-batches of different sizes, with padding
        x = torch.randn(tokens, 5, generator=gen)
        mask = torch.rand(tokens, generator=gen) > 0.25
        out = moe(x, mask)
        indices.append(out.routing.indices)
        masks.append(mask)
        expected, f = _window_reference(indices, masks, out.routing.scores, e)
        torch.testing.assert_close(out.losses["switch"], expected)
        torch.testing.assert_close(out.aux_loss, expected + 0.5 * losses.z_loss(out.routing))
        torch.testing.assert_close(window.fractions()[0], f.double())
        # f has no gradient: the router gradient is E * sum_i f_i dP_i, as in the reference
        got = torch.autograd.grad(out.losses["switch"], moe.router.gate.weight, retain_graph=True)[0]
        want = torch.autograd.grad(expected, moe.router.gate.weight)[0]
        torch.testing.assert_close(got, want)
        if m > 0:  # not the per-micro-batch value any more
            assert abs(float(out.losses["switch"].detach() - losses.switch_loss(out.routing).detach())) > 1e-4
    # the last micro-batch's f is the whole window's: every real token of the 3 micro-batches
    assert int(moe.balance_window[-1]) == int(sum(mk.sum() for mk in masks))
    assert int(moe.balance_window[:-1].sum()) == 2 * int(moe.balance_window[-1])
    finished = window.reset()
    torch.testing.assert_close(finished[0], f.double())
    assert int(moe.balance_window.abs().sum()) == 0
    # after reset: a single micro-batch window is the plain switch loss
    out = moe(torch.randn(5, 5, generator=gen))
    torch.testing.assert_close(out.losses["switch"], losses.switch_loss(out.routing))


def test_balance_window_eval_state_dict_and_errors():
    torch.manual_seed(3)
    moe = moegrad.MoE(5, 8, 4, 2)
    state = moe.state_dict()
    window = BalanceWindow(moe)
    assert set(moe.state_dict()) == set(state)  # the buffer is not persistent
    moe.eval()
    out = moe(torch.randn(6, 5))
    assert int(moe.balance_window.abs().sum()) == 0  # eval neither reads nor adds
    torch.testing.assert_close(out.losses["switch"], losses.switch_loss(out.routing))
    moe.train()
    moe(torch.randn(6, 5))
    assert int(moe.balance_window[-1]) == 6
    with pytest.raises(ValueError, match="already belong to a BalanceWindow"):
        BalanceWindow(moe)
    window.remove()
    assert moe.balance_window is None and "balance_window" not in moe.state_dict()  # detached
    with pytest.raises(ValueError, match="no moegrad.MoE with the switch loss"):
        BalanceWindow(moegrad.MoE(5, 8, 4, 2, losses={"z_loss": 1.0}))
    with pytest.raises(TypeError, match="nn.Module"):
        BalanceWindow([moe])


# --------------------------------------------------------------------------- issue 11, item 12
@pytest.mark.parametrize("bad", [[moegrad.MoE(4, 8, 4, 1, selection_bias=True)], "model", None])
def test_bias_balancer_names_module_and_what_it_takes(bad):
    with pytest.raises(TypeError, match=r"BiasBalancer\(module=\.\.\.\) takes an nn.Module holding "
                                        rf"moegrad Routers built with selection_bias=True.*got {type(bad).__name__}"):
        BiasBalancer(bad)


# --------------------------------------------------------------------------- issue 11, item 6
def _biased_moe(dtype=torch.float32):
    torch.manual_seed(0)
    moe = moegrad.MoE(4, 8, 4, 1, selection_bias=True)
    with torch.no_grad():
        moe.router.bias.fill_(0.5)
    return moe.to(dtype)


def _balance_steps(moe, loads, gamma=1e-3):
    """Run BiasBalancer.step once per row of ``loads`` [steps, E] (set as the load counts);
    -> [steps, E] fp32 bias after each step."""
    balancer = BiasBalancer(moe, gamma=gamma)
    out = []
    for load in loads:
        moe.router.load_counts.copy_(load)
        balancer.step()
        out.append(moe.router.bias.detach().float().clone())
    return torch.stack(out)


def _load_pattern(steps=120):
    """[steps, 4] int64 loads: experts 0, 1 alternate above/below the mean (+gamma, -gamma, ...);
    expert 2 is always below the mean (+gamma every step), expert 3 always above (-gamma)."""
    rows = [[9, 1, 1, 9] if s % 2 == 0 else [1, 9, 1, 9] for s in range(steps)]
    return torch.tensor(rows, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_bias_stays_fp32_exact_when_the_model_is_cast(dtype):
    moe = _biased_moe()
    with torch.no_grad():
        moe.router.bias.copy_(torch.tensor([0.5, 0.501, 0.1234567, -3e-4]))
    exact = moe.router.bias.clone()
    moe.to(dtype)
    assert moe.router.gate.weight.dtype == dtype and moe.router.bias.dtype == torch.float32
    assert torch.equal(moe.router.bias, exact)  # never went through the low precision
    moe.half().bfloat16().double().float()
    assert torch.equal(moe.router.bias, exact)
    # the selection sees the fp32 bias: 0.501 beats 0.5 (both are 0.5 in bf16)
    tied = torch.full((3, 4), 0.25)
    with torch.no_grad():
        moe.router.bias.copy_(torch.tensor([0.5, 0.501, 0.5, 0.5]))
    assert moe.router.select_topk(tied).view(-1).tolist() == [1, 1, 1]
    # a bf16 layer still runs forward with it
    out = moe.to(dtype).train()(torch.randn(6, 4, dtype=dtype))
    assert out.y.dtype == dtype and int(moe.router.load_counts.sum()) == 6


def test_bias_balancer_in_bf16_applies_updates_exactly_as_in_fp32():
    loads = _load_pattern()
    ref = _balance_steps(_biased_moe(torch.float32), loads)
    got = _balance_steps(_biased_moe(torch.bfloat16), loads)
    assert torch.equal(got, ref)  # +1e-3 and -1e-3 both apply, bit for bit as in fp32
    # no drift: the alternating experts come back to 0.5 (to fp32 rounding), the others moved
    # by exactly +-steps * gamma (to fp32 rounding)
    assert torch.allclose(got[-1, :2], torch.tensor([0.5, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(got[-1, 2:], torch.tensor([0.5 + 0.12, 0.5 - 0.12]), atol=1e-5, rtol=0)


def _tiny_deepseek_v3(dtype):
    t = pytest.importorskip("transformers")
    import moegrad.hf as mh

    cfg = t.DeepseekV3Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                             eos_token_id=1, bos_token_id=1, intermediate_size=40,
                             moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                             n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                             norm_topk_prob=True, kv_lora_rank=8, q_lora_rank=12,
                             qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
    torch.manual_seed(0)
    model = t.DeepseekV3ForCausalLM(cfg).to(dtype)
    mh.patch(model)
    router = mh.routers(model)[0]
    with torch.no_grad():
        router.bias.fill_(0.5)
    return model, router


def test_bias_balancer_on_a_bf16_hf_deepseek_v3_bias_keeps_an_fp32_master_copy():
    model, router = _tiny_deepseek_v3(torch.bfloat16)
    hf_bias = router.gate.e_score_correction_bias
    assert router.bias is hf_bias and hf_bias.dtype == torch.bfloat16  # HF's buffer, cast by .to()
    loads = _load_pattern()
    balancer = BiasBalancer(model, gamma=1e-3)
    ref = torch.full((4,), 0.5)  # the same updates applied in fp32
    for load in loads:
        router.load_counts.copy_(load)
        balancer.step()
        ref += 1e-3 * torch.sign(load.float().mean() - load.float())
        assert hf_bias.dtype == torch.bfloat16
        assert torch.equal(hf_bias, ref.to(torch.bfloat16))  # the buffer: fp32 sum, rounded once
    assert torch.equal(balancer._masters[0], ref)
    # symmetric: the alternating experts end where they started, the steady ones moved 0.12
    assert hf_bias[:2].tolist() == [0.5, 0.5]
    assert hf_bias[2:].float().tolist() == ref[2:].to(torch.bfloat16).float().tolist()
    assert abs(float(hf_bias[2]) - 0.62) < 2e-3 and abs(float(hf_bias[3]) - 0.38) < 2e-3
    # set elsewhere (e.g. a checkpoint loaded): the master copy restarts from the buffer
    with torch.no_grad():
        hf_bias.fill_(-1.0)
    router.load_counts.copy_(torch.tensor([9, 1, 1, 9]))
    balancer.step()
    assert hf_bias.tolist() == torch.tensor([-1.001, -0.999, -0.999, -1.001]).to(torch.bfloat16).tolist()
    # and the patched bf16 model still trains its selection with it
    model.train()
    model(torch.randint(2, 64, (2, 5)))
    assert int(router.load_counts.sum()) == 2 * 5 * 2


def test_switch_megatron_with_a_balance_window_counts_once():
    torch.manual_seed(3)
    moe = moegrad.MoE(5, 8, 6, 2, losses={"switch": 1.0, "switch_megatron": 1.0})
    window = BalanceWindow(moe)
    for _ in range(2):
        out = moe(torch.randn(7, 5))
    assert int(moe.balance_window[-1]) == 14  # two micro-batches of 7 real tokens, not 28
    torch.testing.assert_close(out.losses["switch_megatron"], out.losses["switch"] / 2)
    only = moegrad.MoE(5, 8, 6, 2, losses={"switch_megatron": 1.0})
    BalanceWindow(only)
    only(torch.randn(7, 5))
    assert int(only.balance_window[-1]) == 7
    window.remove()


def test_public_names_are_these_classes_and_losses_holds_only_functions():
    assert moegrad.BiasBalancer is BiasBalancer and moegrad.BalanceWindow is BalanceWindow
    assert not {"BalanceWindow", "BiasBalancer"} & set(losses.__all__)



@pytest.mark.parametrize("module, name, new", [
    ("moegrad.losses", "BiasBalancer", "moegrad.balancing"),
    ("moegrad.losses", "BalanceWindow", "moegrad.balancing"),
    ("moegrad.distributed", "init_process_group_for_tests", "moegrad._testing"),
    ("moegrad.distributed", "free_port", "moegrad._testing"),
])
def test_moved_names_still_import_from_their_old_module_with_a_deprecation_warning(module, name, new):
    import importlib

    old = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=rf"{module}.{name} has moved to {new}.{name}"):
        value = getattr(old, name)
    assert value is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="has no attribute 'Balancer'"):
        _ = old.Balancer


# ----------------------------------------------------------------------------- QuantileBalancer
def _k3_reference(scores, masks, bias, top_k):
    """The K3 bias by sorting (no histogram): alpha_t = (K+1)-th largest of s_t + b, d = alpha - s
    over the real tokens of every micro-batch, b'_j = ceil(K N / E)-th smallest d_.j, centred."""
    s = torch.cat([sc[m] for sc, m in zip(scores, masks)]).detach().double()  # [N, E]
    n, e = s.shape
    alpha = (s + bias.double()).sort(dim=-1, descending=True).values[:, top_k]
    d = (alpha[:, None] - s).sort(dim=0).values
    b = d[math.ceil(top_k * n / e) - 1]
    return b - b.mean(), d, n


def _skewed_moe(e=8, k=2, d=16, strength=2.0, score="softmax", seed=0):
    """An MoE whose gate favours experts 0 and 1 along a direction u the data leans to."""
    torch.manual_seed(seed)
    moe = moegrad.MoE(d, 16, e, k, selection_bias=True, losses={}, score=score)
    u = torch.randn(d)
    u /= u.norm()
    with torch.no_grad():
        moe.router.gate.weight[:2] += strength * u
    return moe, u


@pytest.mark.parametrize("score,bins", [("softmax", 4096), ("sigmoid", 512)])
def test_quantile_balancer_matches_the_sorted_k3_formula(score, bins):
    moe, u = _skewed_moe(e=6, k=2, score=score)
    with torch.no_grad():
        moe.router.bias.copy_(torch.tensor([0.1, -0.2, 0.05, 0.0, 0.3, -0.25]))  # alpha uses it
    bias0 = moe.router.bias.clone()
    qb = QuantileBalancer(moe, bins=bins)
    gen = torch.Generator().manual_seed(1)
    scores, masks = [], []
    for tokens in (40, 27):  # 2 micro-batches with padding
        x = torch.randn(tokens, 16, generator=gen) + u
        mask = torch.rand(tokens, generator=gen) > 0.3
        scores.append(moe(x, mask).routing.scores)
        masks.append(mask)
    ref, d, n = _k3_reference(scores, masks, bias0, 2)
    width = (float(bias0.max()) - float(bias0.min()) + 2) / bins
    assert int(qb.histograms[0].sum()) == n * 6  # every real (token, expert) pair once
    loads = qb.step()
    assert abs(float(loads[0].sum()) - 2 * n) < 1e-6
    b = moe.router.bias
    assert b.dtype == torch.float32
    assert float((b.double() - ref).abs().max()) <= width  # centring keeps the half-width bound x2
    assert abs(float(b.sum())) < 1e-5
    # direction: the uncentred b'_j has at least K/E of the d_.j at or below it, fewer strictly
    # below (token t takes expert j when d_tj < b_j: about K N / E tokens, not (1 - K/E) N)
    raw = d[math.ceil(2 * n / 6) - 1]
    assert bool(((d <= raw).double().mean(0) >= 2 / 6).all())
    assert bool(((d < raw).double().mean(0) < 2 / 6).all())
    assert int(qb.histograms[0].sum()) == 0


def test_histogram_quantile_rule_on_plain_lists():
    # values 0.1, 0.1, 0.6, 0.9 in 4 bins over [0, 1): rank 3 of 4 is in bin 2 (centre 0.625)
    assert histogram_quantile([2, 0, 1, 1], 3, 0.0, 0.25) == 0.625
    assert histogram_quantile([2, 0, 1, 1], 1, 0.0, 0.25) == 0.125
    with pytest.raises(ValueError, match="rank=5"):
        histogram_quantile([2, 0, 1, 1], 5, 0.0, 0.25)


def test_quantile_balancer_approaches_balance_faster_than_bias_balancer():
    def run(make, steps=15):
        moe, u = _skewed_moe()
        moe.requires_grad_(False)  # gate frozen: only the bias moves
        balancer = make(moe)
        gen = torch.Generator().manual_seed(2)
        out = []
        for _ in range(steps):
            for _ in range(2):
                moe(torch.randn(256, 16, generator=gen) + u)
            out.append(max_violation(balancer.step()[0]))
        return out

    qb, bias = run(QuantileBalancer), run(BiasBalancer)
    assert qb[0] == pytest.approx(bias[0]) and qb[0] > 1.0  # same skewed start
    tail = sum(qb[-5:]) / 5
    assert tail < 0.35, qb
    assert tail < sum(bias[-5:]) / 5, (qb, bias)


def test_quantile_balancer_counts_checkpointed_forward_once_and_eval_not_at_all():
    moe, u = _skewed_moe(e=4, k=1)
    qb = QuantileBalancer(moe)
    x = (torch.randn(10, 16) + u).requires_grad_(True)
    out = checkpoint(lambda t: moe(t).y, x, use_reentrant=False)
    out.sum().backward()
    assert int(qb.histograms[0].sum()) == 10 * 4
    moe.eval()
    moe(x)
    assert int(qb.histograms[0].sum()) == 10 * 4
    before = moe.router.bias.clone()
    moe.train()
    qb.histograms[0].zero_()
    qb.step()  # nothing counted: the bias stays
    assert torch.equal(moe.router.bias, before)


def test_quantile_balancer_refuses_a_bias_changed_outside_its_range_mid_step():
    """The histogram range holds for the bias extremes the step began with: a bias moved
    outside them before step() would be clamped into the end bins, so it is refused; reset()
    starts the step again."""
    moe, u = _skewed_moe(e=4, k=1)
    qb = QuantileBalancer(moe, bins=64)
    moe(torch.randn(12, 16) + u)
    with torch.no_grad():
        moe.router.bias -= 3.0  # changes no selection, but every d of the next forward is out of range
    with pytest.raises(ValueError, match="bias of router 0 changed during a step.*reset"):
        moe(torch.randn(12, 16) + u)
    qb.reset()
    assert int(qb.histograms[0].sum()) == 0
    moe(torch.randn(12, 16) + u)
    assert int(qb.histograms[0].sum()) == 12 * 4
    qb.step()


def test_quantile_balancer_remove_and_errors():
    moe, _ = _skewed_moe(e=4, k=1)
    qb = QuantileBalancer(moe, bins=16)
    with pytest.raises(ValueError, match="already belong to a QuantileBalancer"):
        QuantileBalancer(moe)
    qb.remove()
    moe(torch.randn(5, 16))
    QuantileBalancer(moe)  # free again
    with pytest.raises(ValueError, match="bins=1"):
        QuantileBalancer(moegrad.MoE(4, 8, 4, 1, selection_bias=True), bins=1)
    with pytest.raises(TypeError, match="bins must be an int"):
        QuantileBalancer(moegrad.MoE(4, 8, 4, 1, selection_bias=True), bins=8.0)
    with pytest.raises(ValueError, match="selection_bias=True"):
        QuantileBalancer(moegrad.MoE(4, 8, 4, 1))
    with pytest.raises(ValueError, match="top_k < num_experts"):
        QuantileBalancer(moegrad.MoE(4, 8, 4, 4, selection_bias=True))
    with pytest.raises(TypeError, match="QuantileBalancer"):
        QuantileBalancer([moe])


def _qb_inputs(rank, micro):
    gen = torch.Generator().manual_seed(100 + 10 * rank + micro)
    x = torch.randn(12, 8, generator=gen)
    return x, torch.rand(12, generator=gen) > 0.25


def _qb_moe():
    torch.manual_seed(5)
    moe = moegrad.MoE(8, 12, 4, 1, selection_bias=True, losses={})
    with torch.no_grad():
        moe.router.gate.weight[0] += 1.0
    return moe


def _qb_worker(rank, world, port, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    from moegrad._testing import init_process_group_for_tests, rank_results
    from moegrad.distributed import expert_parallel

    init_process_group_for_tests(rank, world, port, 20.0)
    with rank_results(out_dir, rank) as result:
        moe = expert_parallel(_qb_moe())
        qb = QuantileBalancer(moe, bins=256)
        for micro in range(2):
            moe(*_qb_inputs(rank, micro))
        loads = qb.step()
        result.update(bias=moe.router.bias.tolist(), loads=loads[0].tolist())


def test_quantile_balancer_two_ranks_equal_the_global_batch(tmp_path):
    from moegrad._testing import free_port, spawn_and_wait

    # ~5 s alone; generous on a loaded 2-core machine
    spawn_and_wait(_qb_worker, (2, free_port(), str(tmp_path)), 2, 120, "the 2-process group")
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    with one_torch_thread():  # as the ranks: the same scores to the bit
        moe = _qb_moe()  # one process, every micro-batch of both ranks
        qb = QuantileBalancer(moe, bins=256)
        for rank in range(2):
            for micro in range(2):
                moe(*_qb_inputs(rank, micro))
        loads = qb.step()
    for res in results:
        assert "error" not in res, res["error"]
        assert res["bias"] == moe.router.bias.tolist()
        assert res["loads"] == loads[0].tolist()
    assert moe.router.bias.abs().max() > 0


def test_balancing_skewed_example_runs_briefly(tmp_path):
    import runpy
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "balancing_skewed.py"
    main = runpy.run_path(str(example))["main"]
    out = tmp_path / "plot.png"
    summary = main(["--steps", "5", "--seeds", "2", "--out", str(out)])
    assert out.stat().st_size > 0
    assert set(summary) == {"switch", "bias", "quantile"}
    assert summary["quantile"]["final"] < summary["bias"]["final"]


def test_quantile_balancer_sets_a_patched_deepseek_v3_correction_bias():
    pytest.importorskip("transformers")
    import moegrad.hf as mh
    from tests.hf.models import ids, tiny

    model = tiny("deepseek_v3").train()
    mh.patch(model)
    qb = QuantileBalancer(model, bins=512)
    router = mh.routers(model)[0]
    hf_bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert router.bias is hf_bias
    model(ids(8))
    routing = router.last_routing
    assert routing.mask is None
    ref, _, _ = _k3_reference([routing.scores], [torch.ones(routing.num_tokens, dtype=torch.bool)],
                              hf_bias.clone(), router.top_k)
    width = (float(hf_bias.max()) - float(hf_bias.min()) + 2) / 512
    qb.step()
    assert float((hf_bias.double() - ref).abs().max()) <= width
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()
