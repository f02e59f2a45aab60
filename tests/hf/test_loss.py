"""moegrad.hf losses: outputs.loss, aux_loss, the family's own aux loss and Trainer.

Tiny random configs, no network.
Shapes: B batch, S sequence, T tokens, D hidden, E experts, K top-k.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import moegrad.hf as mh  # noqa: E402
from moegrad.losses import switch_loss  # noqa: E402
from tests.hf.models import FAMILIES, OTHER, SAME, grads, ids, maxabs, tiny  # noqa: E402


@pytest.mark.parametrize("family", [
    pytest.param(f, marks=pytest.mark.skip(reason="transformers' DeepSeek-V3 has no router aux "
                                           "loss (it balances with e_score_correction_bias)"))
    if f == "deepseek_v3" else f for f in FAMILIES])
def test_hf_aux_loss_unchanged(family):
    """output_router_logits=True: HF's aux loss, the total loss and every gradient (the aux
    loss reaches the router through the gate module the patched block still calls) match."""
    model = tiny(family, router_aux_loss_coef=0.3).train()
    x = ids(2)
    ref = model(x, labels=x, output_router_logits=True)
    ref.loss.backward()
    g_ref = grads(model)
    model.zero_grad()
    assert ref.aux_loss is not None and float(ref.aux_loss.detach()) > 0
    mh.patch(model, SAME[family])
    out = model(x, labels=x, output_router_logits=True)
    out.loss.backward()
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert len(out.router_logits) == model.config.num_hidden_layers
    for name, value in grads(model).items():
        torch.testing.assert_close(value, g_ref[name], atol=1e-5, rtol=1e-4, msg=name)
    if OTHER[family] != SAME[family]:  # another router gradient: the same HF aux loss
        mh.unpatch(model)
        mh.patch(model, OTHER[family])
        out = model(x, labels=x, output_router_logits=True)
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


def test_moegrad_losses_per_block():
    model = tiny("mixtral").train()
    x = ids(7)
    mh.patch(model, losses={"switch": 0.5, "z_loss": 0.1})
    out = model(x, output_router_logits=True)
    total = mh.aux_loss(model)
    expect = 0.0
    for z in out.router_logits:  # independent: per layer E * sum_i f_i P_i and mean lse^2
        p = torch.softmax(z.float(), -1)
        picked = torch.zeros_like(p).scatter(1, p.topk(2, -1).indices, 1.0)
        switch = z.shape[1] * (picked.mean(0) * p.mean(0)).sum()
        expect = expect + 0.5 * switch + 0.1 * torch.logsumexp(z.float(), -1).square().mean()
    torch.testing.assert_close(total, expect, atol=1e-5, rtol=1e-5)
    total.backward()
    assert float(model.model.layers[0].mlp.gate.weight.grad.abs().sum()) > 0
    assert mh.aux_loss(model).item() == 0.0  # cleared after reading
    r = mh.routers(model)[0]
    assert r.last_routing.indices.shape == (x.numel(), 2)
    torch.testing.assert_close(switch_loss(r.last_routing), torch.tensor(
        6 * (torch.zeros(x.numel(), 6).scatter(1, r.last_routing.indices, 1.0).mean(0)
             * r.last_routing.scores.mean(0)).sum().item()))


def lm_loss(logits, labels):
    """Independent causal-LM loss: mean cross-entropy of the logits at t against labels at t+1."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, v), labels[:, 1:].reshape(-1))


def test_trainer_trains_on_lm_loss_plus_moegrad_aux_loss(tmp_path):
    """transformers.Trainer trains on outputs.loss. After patch(losses={"switch": 0.5}) that is,
    at each of 3 steps, the LM loss + moegrad's aux loss, both recomputed here (cross-entropy of
    the logits; 0.5 E sum_i f_i P_i per layer from z = x W^T of the block input), and the
    family's own aux loss is not added although output_router_logits=True asks transformers for
    it. The router weight gradient of the loss equals that of the independent sum, whose aux
    part alone is not zero: the router receives the balance gradient."""
    pytest.importorskip("accelerate")
    model = tiny("qwen3_moe", router_aux_loss_coef=0.3, output_router_logits=True)
    mh.patch(model, "dense", losses={"switch": 0.5})
    blocks = [layer.mlp for layer in model.model.layers]
    gates = [b.gate.weight for b in blocks]
    block_inputs = {}
    for b in blocks:
        b.register_forward_pre_hook(lambda m, args: block_inputs.__setitem__(m, args[0]))
    before = [g.detach().clone() for g in gates]
    checked = []

    class CheckedTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
            ce = lm_loss(out.logits, inputs["labels"])
            aux = 0.0
            for b in blocks:
                z = block_inputs[b].reshape(-1, 32) @ b.gate.weight.T  # [T, E]
                p = torch.softmax(z, -1)
                f = torch.zeros_like(p).scatter(1, p.topk(2, -1).indices, 1.0).mean(0)
                aux = aux + 0.5 * 6 * (f * p.mean(0)).sum()
            torch.testing.assert_close(loss, ce + aux, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.aux_loss, aux, atol=1e-6, rtol=0)
            assert len(out.router_logits) == 2
            g = torch.autograd.grad(loss, gates, retain_graph=True)
            g_ref = torch.autograd.grad(ce + aux, gates, retain_graph=True)
            g_aux = torch.autograd.grad(aux, gates, retain_graph=True)
            for a, r, ra in zip(g, g_ref, g_aux):
                torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)
                assert maxabs(ra) > 1e-4
            checked.append((float(loss.detach()), float(ce.detach()), float(aux.detach())))
            return (loss, out) if return_outputs else loss

    g = torch.Generator().manual_seed(8)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(2, 64, (6, 9), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0)
    trainer = CheckedTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert trainer.state.global_step == 3 and len(checked) == 3
    assert all(aux > 0.5 * 2 * 2 * 0.9 for _, _, aux in checked)  # 0.5 * layers * (>= K at balance)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([c[0] for c in checked], abs=1e-4)
    assert all(maxabs(g - b) > 0 for g, b in zip(gates, before))


@pytest.mark.parametrize("family", FAMILIES)
def test_exactly_one_balance_loss_reaches_outputs_loss(family):
    """With labels, moegrad's configured aux loss A is in outputs.loss and outputs.aux_loss,
    whether or not output_router_logits asks transformers for the family's own (never both);
    return_dict=False gives the same (loss, aux_loss, logits, ...); a later aux_loss(model) warns
    and returns 0 (not counted twice). Without labels nothing is added and aux_loss reads A."""
    model = tiny(family, router_aux_loss_coef=0.3).train()
    x = ids(22)
    own = model(x, labels=x, output_router_logits=True)
    if family != "deepseek_v3":  # transformers' DeepSeek-V3 has no router aux loss
        torch.testing.assert_close(own.loss, lm_loss(own.logits, x) + 0.3 * own.aux_loss)
        assert float(own.aux_loss.detach()) > 0.5
    coefficients = {"switch": 0.5, "z_loss": 0.1}
    mh.patch(model, SAME[family], losses=coefficients)

    def moegrad_aux():  # the weighted losses each block stored (kept detached once consumed)
        return sum(c * r.last_losses[n] for r in mh.routers(model) for n, c in coefficients.items())

    for record in (False, True):
        out = model(x, labels=x, output_router_logits=record)
        aux = moegrad_aux()
        assert float(aux.detach()) > 1.0
        torch.testing.assert_close(out.loss, lm_loss(out.logits, x) + aux, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.aux_loss, aux, atol=1e-6, rtol=0)
        layers = len(mh.routers(model))  # DeepSeek-V3: its first layer is dense
        assert (out.router_logits is not None and len(out.router_logits) == layers) == record
        torch.testing.assert_close(out.logits, own.logits, atol=1e-5, rtol=0)
        with pytest.warns(UserWarning, match="already in outputs.loss"):
            assert mh.aux_loss(model).item() == 0.0
    tup = model(x, labels=x, return_dict=False)
    torch.testing.assert_close(tup[0], lm_loss(tup[2], x) + moegrad_aux(), atol=1e-5, rtol=0)
    torch.testing.assert_close(tup[1], moegrad_aux(), atol=1e-6, rtol=0)
    out = model(x)  # no labels: nothing added, the stored losses read by hand
    assert out.loss is None and out.aux_loss is None
    expect = moegrad_aux()
    torch.testing.assert_close(mh.aux_loss(model), expect, atol=1e-6, rtol=0)


def test_no_balance_loss_warns_and_unpatch_restores_the_loss():
    """A training forward with labels that adds no balance loss (no losses=, the family's own
    off) warns; with output_router_logits, in eval, or for DeepSeek-V3 (no router aux loss) it
    does not. unpatch gives the HF forward and loss back."""
    import warnings as w

    model = tiny("qwen3_moe", router_aux_loss_coef=0.3).train()
    x = ids(23)
    ref = model(x, labels=x, output_router_logits=True)
    mh.patch(model, "dense")
    with pytest.warns(UserWarning, match="adds no balance loss.*output_router_logits is off"):
        model(x, labels=x)
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        out = model(x, labels=x, output_router_logits=True)
        model.eval()
        model(x, labels=x)
        ds = mh.patch(tiny("deepseek_v3").train(), "topk")
        ds(x, labels=x)
    assert not [c for c in caught if "balance loss" in str(c.message)]
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)  # the family's own
    mh.patch(mh.unpatch(model), "dense", losses={"switch": 0.5})
    assert "forward" in model.__dict__
    mh.unpatch(model)
    assert "forward" not in model.__dict__ and "forward" not in model.model.layers[0].mlp.__dict__
    model.train()
    out = model(x, labels=x, output_router_logits=True)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
