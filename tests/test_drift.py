"""moegrad.diagnostics.drift: routing drift between two models, against hand-computed values.

Shapes: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import moegrad
from moegrad.diagnostics import compare_routing, js_divergence, topk_overlap


def hand_router(columns: list[list[float]], top_k: int = 1) -> moegrad.Router:
    """A Router with D = len(columns) whose token x = e_j (one-hot) gets the softmax scores
    ``columns[j]``: gate.weight[:, j] = ln(columns[j]), and softmax(ln p) = p for sum(p) = 1."""
    router = moegrad.Router(len(columns), len(columns[0]), top_k)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor(columns, dtype=torch.float32).log().T)
    return router


def js_by_hand(p: list[float], q: list[float]) -> float:
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda u: sum(a * math.log(a / c) for a, c in zip(u, m) if a > 0)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


P1, Q1 = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]  # token 1 under a and b: top-1 expert 0 vs 1
P2 = [0.2, 0.3, 0.5]                            # token 2, the same under a and b: expert 2


def test_topk_overlap_and_js_against_hand_values():
    a = torch.tensor([[0, 1], [3, 2], [0, 1]])
    b = torch.tensor([[1, 2], [2, 3], [2, 3]])
    assert topk_overlap(a, b).tolist() == [0.5, 1.0, 0.0]  # order of the picks is irrelevant
    js = js_divergence(torch.tensor([P1, P2]), torch.tensor([Q1, P2]))
    # JS(P1, Q1) = 1/2 ln(4/3) + 1/4 ln(2/3) (m = (3/8, 3/8, 1/4)), JS(P2, P2) = 0
    assert js[0].item() == pytest.approx(0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3), abs=1e-12)
    assert js[0].item() == pytest.approx(js_by_hand(P1, Q1), abs=1e-12)
    assert js[1].item() == 0.0
    # disjoint supports reach ln 2; rows are renormalised first (sigmoid scores)
    assert js_divergence(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).item() == \
        pytest.approx(math.log(2))
    assert js_divergence(torch.tensor([[0.2, 0.6]]), torch.tensor([[0.1, 0.3]])).item() == \
        pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="indices_a and indices_b"):
        topk_overlap(a, b[:, :1])
    with pytest.raises(ValueError, match="scores_a and scores_b"):
        js_divergence(torch.ones(2, 3), torch.ones(2, 4))


def test_compare_routing_two_hand_built_routers():
    model_a = hand_router([P1, P2])
    model_b = hand_router([Q1, P2])
    x = torch.eye(2)  # token 1 = e_0, token 2 = e_1
    [layer] = compare_routing(model_a, model_b, [x])
    assert layer["layer"] == "router" and layer["num_experts"] == 3 and layer["top_k"] == 1
    assert layer["tokens"] == 2
    assert layer["topk_overlap"] == pytest.approx(0.5)  # (0 + 1) / 2
    assert layer["js_divergence"] == pytest.approx((js_by_hand(P1, Q1) + 0.0) / 2, abs=1e-7)
    assert layer["js_divergence"] == pytest.approx(0.0212376, abs=1e-6)
    assert layer["load_a"] == [0.5, 0.0, 0.5] and layer["load_b"] == [0.0, 0.5, 0.5]
    assert layer["revived"] == [1] and layer["killed"] == [0]
    # the reverse comparison swaps revived and killed; a model against itself does not drift
    [back] = compare_routing(model_b, model_a, [x])
    assert back["revived"] == [0] and back["killed"] == [1]
    [same] = compare_routing(model_a, model_a, [x, x])
    assert same["tokens"] == 4 and same["topk_overlap"] == 1.0 and same["js_divergence"] == 0.0
    assert same["revived"] == same["killed"] == []


def test_compare_routing_top2_several_batches_and_padding_mask():
    # E = 4, K = 2: token 1 {0, 1} vs {1, 2}, token 2 {2, 3} vs {2, 3}
    a1, b1 = [0.4, 0.3, 0.2, 0.1], [0.1, 0.4, 0.3, 0.2]
    a2, b2 = [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.4, 0.3]
    model_a, model_b = hand_router([a1, a2], top_k=2), hand_router([b1, b2], top_k=2)
    x = torch.eye(2)
    # batch 1: both tokens; batch 2: [1, 2, D] with token 2 marked as padding (left out)
    batches = [x, (x[None], torch.tensor([[True, False]]))]
    [layer] = compare_routing(model_a, model_b, batches)
    assert layer["tokens"] == 3
    assert layer["topk_overlap"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    js1, js2 = js_by_hand(a1, b1), js_by_hand(a2, b2)
    assert layer["js_divergence"] == pytest.approx((2 * js1 + js2) / 3, abs=1e-7)
    # pairs under a: {0,1},{2,3},{0,1} -> counts [2,2,1,1] / 6; under b: {1,2},{2,3},{1,2}
    assert layer["load_a"] == pytest.approx([2 / 6, 2 / 6, 1 / 6, 1 / 6])
    assert layer["load_b"] == pytest.approx([0.0, 2 / 6, 3 / 6, 1 / 6])
    assert layer["revived"] == [] and layer["killed"] == [0]


class TwoLayers(nn.Module):
    """Two moegrad.MoE layers in sequence (residual), for the end-to-end comparison."""

    def __init__(self, estimator: str = "topk") -> None:
        super().__init__()
        self.layers = nn.ModuleList(moegrad.MoE(8, 16, 4, 2, estimator=estimator, losses={})
                                    for _ in range(2))

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = x + layer(x, mask).y
        return x


def routings_by_hand(model: TwoLayers, x: torch.Tensor) -> list:
    """[(indices [T, K], scores [T, E])] per layer from the model's own forward in eval mode."""
    out, h = [], x
    with torch.no_grad():
        for layer in model.layers:
            o = layer.eval()(h)
            out.append((o.routing.indices, o.routing.scores))
            h = h + o.y
    return out


def test_compare_routing_end_to_end_two_moe_models_restores_modes():
    torch.manual_seed(0)
    model_a = TwoLayers("dense")
    model_b = copy.deepcopy(model_a)
    with torch.no_grad():  # move one layer's router: layer 0 drifts, layer 1 sees other inputs
        model_b.layers[0].router.gate.weight.add_(torch.randn(4, 8))
    model_a.train()
    model_b.train()
    model_b.layers[1].eval()  # a mixed state, restored module by module
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    got = compare_routing(model_a, model_b, [(x, mask), x[:1]])
    assert [g["layer"] for g in got] == ["layers.0.router", "layers.1.router"]
    assert model_a.training and all(m.training for m in model_a.modules())
    assert model_b.training and model_b.layers[0].training and not model_b.layers[1].training
    assert not model_b.layers[1].router.training
    # the independent computation: each model's routings read from its layers' outputs
    ref_a = [routings_by_hand(model_a, x), routings_by_hand(model_a, x[:1])]
    ref_b = [routings_by_hand(model_b, x), routings_by_hand(model_b, x[:1])]
    keep = [mask.reshape(-1), torch.ones(5, dtype=torch.bool)]
    for i, layer in enumerate(got):
        overlaps, jss, ca, cb = [], [], torch.zeros(4), torch.zeros(4)
        for b in range(2):
            (ia, sa), (ib, sb) = ref_a[b][i], ref_b[b][i]
            for t in torch.nonzero(keep[b]).flatten().tolist():
                overlaps.append(len(set(ia[t].tolist()) & set(ib[t].tolist())) / 2)
                jss.append(js_by_hand(sa[t].tolist(), sb[t].tolist()))
                for e in ia[t].tolist():
                    ca[e] += 1
                for e in ib[t].tolist():
                    cb[e] += 1
        assert layer["tokens"] == len(overlaps) == 8 + 5
        assert layer["topk_overlap"] == pytest.approx(sum(overlaps) / len(overlaps))
        assert layer["js_divergence"] == pytest.approx(sum(jss) / len(jss), abs=1e-6)
        assert layer["load_a"] == pytest.approx((ca / ca.sum()).tolist())
        assert layer["load_b"] == pytest.approx((cb / cb.sum()).tolist())
    assert got[0]["topk_overlap"] < 1.0 and got[0]["js_divergence"] > 1e-3


def test_compare_routing_runs_in_eval_mode():
    """A sampling estimator routes deterministically in eval mode: a training-mode gumbel model
    compared with itself gives overlap 1 and JS 0, and its training-only load counts stay 0."""
    torch.manual_seed(0)
    g = moegrad.MoE(8, 16, 4, 2, estimator="gumbel", losses={}).train()
    with torch.no_grad():
        g.router.gate.weight.normal_(0, 0.1)
    x = torch.randn(64, 8)
    with torch.no_grad():  # in training mode two forwards draw different selections
        first, second = (g(x).routing.indices.sort(-1).values for _ in range(2))
        assert not torch.equal(first, second)
    g.router.reset_load_counts()
    [layer] = compare_routing(g, g, [x, x])
    assert layer["tokens"] == 128 and layer["topk_overlap"] == 1.0 and layer["js_divergence"] == 0.0
    assert g.training and int(g.router.load_counts.sum()) == 0


def test_compare_routing_rejects_different_layers_and_bad_batches():
    a = moegrad.MoE(8, 16, 4, 2, losses={})
    with pytest.raises(ValueError, match=r"same router layers.*\('router', 4, 2\).*\('router', 4, 1\)"):
        compare_routing(a, moegrad.MoE(8, 16, 4, 1, losses={}), [torch.randn(3, 8)])
    with pytest.raises(ValueError, match="same router layers"):
        compare_routing(a, moegrad.MoE(8, 16, 6, 2, losses={}), [torch.randn(3, 8)])
    with pytest.raises(ValueError, match="same router layers"):
        compare_routing(TwoLayers(), a, [torch.randn(3, 8)])
    with pytest.raises(ValueError, match="no moegrad.Router layer"):
        compare_routing(nn.Linear(8, 8), nn.Linear(8, 8), [torch.randn(3, 8)])
    with pytest.raises(ValueError, match="batches is empty"):
        compare_routing(a, a, [])
    with pytest.raises(TypeError, match="Tensor.*tuple.*dict.*got list"):
        compare_routing(a, a, [[torch.randn(3, 8)]])
    with pytest.raises(TypeError, match="model_b must be a torch.nn.Module"):
        compare_routing(a, "model", [torch.randn(3, 8)])
    a.train()
    with pytest.raises(ValueError, match="no real"):  # every token is padding
        compare_routing(a, a, [(torch.randn(3, 8), torch.zeros(3, dtype=torch.bool))])
    assert a.training  # restored after the error


def tiny_qwen3(seed: int):
    """A tiny random Qwen3-MoE (E = 6, K = 2, 2 layers) patched by moegrad.hf, no network."""
    transformers = pytest.importorskip("transformers")
    import moegrad.hf as mh

    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0,
                                      intermediate_size=40, moe_intermediate_size=24, num_experts=6,
                                      num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(cfg).float().eval()
    for m in model.modules():  # sharpen the near-uniform HF init so selections are clear
        if type(m).__name__.endswith("TopKRouter"):
            m.weight.data.normal_(0, 0.5)
    return mh.patch(model, estimator="dense")


def test_compare_routing_hf_patched_models_with_attention_mask():
    import moegrad.hf as mh

    model_a, model_b = tiny_qwen3(0), tiny_qwen3(0)
    with torch.no_grad():  # drift the second layer's router only
        mh.routers(model_b)[1].gate.weight.add_(torch.randn(6, 32))
    ids = torch.randint(2, 64, (2, 6))
    attention = torch.ones(2, 6, dtype=torch.long)
    attention[1, 4:] = 0  # two padding tokens
    model_a.train()
    got = compare_routing(model_a, model_b, [{"input_ids": ids, "attention_mask": attention}])
    assert model_a.training and not model_b.training
    assert [g["layer"] for g in got] == ["model.layers.0.mlp.moegrad_router",
                                         "model.layers.1.mlp.moegrad_router"]
    assert [g["tokens"] for g in got] == [10, 10]  # padding left out
    assert got[0]["topk_overlap"] == 1.0 and got[0]["js_divergence"] == pytest.approx(0.0, abs=1e-12)
    # layer 1 against the routings each patched block recorded (last_routing), real tokens only
    real = attention.reshape(-1).bool()
    model_a.eval()
    with torch.no_grad():
        model_a(input_ids=ids, attention_mask=attention)
        model_b(input_ids=ids, attention_mask=attention)
    ra, rb = mh.routers(model_a)[1].last_routing, mh.routers(model_b)[1].last_routing
    ia, ib, sa, sb = ra.indices[real], rb.indices[real], ra.scores[real], rb.scores[real]
    overlap = sum(len(set(u.tolist()) & set(v.tolist())) / 2 for u, v in zip(ia, ib)) / 10
    js = sum(js_by_hand(u.tolist(), v.tolist()) for u, v in zip(sa, sb)) / 10
    assert got[1]["topk_overlap"] == pytest.approx(overlap) and overlap < 1.0
    assert got[1]["js_divergence"] == pytest.approx(js, abs=1e-6) and js > 1e-3
    # a patched HF model against a plain moegrad model: different layers
    with pytest.raises(ValueError, match="same router layers"):
        compare_routing(model_a, moegrad.MoE(32, 16, 6, 2, losses={}), [ids])


def test_pair_routings_compare_their_chosen_sets():
    """ReMoE routers (gates = ReLU(x W^T), one-hot tokens read column j of W^T): token 0 has
    experts {0, 1} in a and {1} in b (overlap 1/2), token 1 {2} in both (1), token 2 none in a and
    {0, 2} in b (0/2 = 0), token 3 none in both (empty sets overlap fully: 1)."""
    gates_a = [[1.0, 2.0, -1.0], [-1.0, -1.0, 3.0], [-1.0, -2.0, -1.0], [-1.0, -1.0, -1.0]]
    gates_b = [[-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [2.0, -1.0, 2.0], [-3.0, -1.0, -1.0]]
    routers = []
    for gates in (gates_a, gates_b):
        r = moegrad.Router(4, 3, 1, routing="remoe")
        with torch.no_grad():
            r.gate.weight.copy_(torch.tensor(gates).T)
        routers.append(r)
    (layer,) = compare_routing(routers[0], routers[1], [torch.eye(4)])
    assert layer["tokens"] == 4
    assert layer["topk_overlap"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    # loads: a chose 0,1 | 2 -> [1, 1, 1] / 3; b chose 1 | 2 | 0, 2 -> [1, 1, 2] / 4
    assert layer["load_a"] == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert layer["load_b"] == pytest.approx([0.25, 0.25, 0.5])
    # JS of the renormalised gates; an all-zero row is uniform
    rows_a = [[1 / 3, 2 / 3, 0], [0, 0, 1], [1 / 3] * 3, [1 / 3] * 3]
    rows_b = [[0, 1, 0], [0, 0, 1], [0.5, 0, 0.5], [1 / 3] * 3]
    assert layer["js_divergence"] == pytest.approx(
        sum(js_by_hand(p, q) for p, q in zip(rows_a, rows_b)) / 4)
    assert layer["revived"] == [] and layer["killed"] == []
