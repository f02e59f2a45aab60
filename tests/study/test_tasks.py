"""moegrad.study.tasks and charlm: task knobs, router initialisation, shifted distributions."""

import math

import pytest
import torch

from moegrad.study.tasks import ROUTER_STD, Clusters, get_task


def test_clusters_knobs_and_settings():
    task = Clusters(0, num_classes=6, num_experts=12, top_k=2, dim=8, lr=0.01, router_init="normal")
    assert task.centres.shape == (6, 8) and task.val[0].shape[1] == 8
    assert task.settings() == {"task": "clusters", "top_k": 2, "num_experts": 12,
                               "router_init": "normal", "lr": 0.01, "routing": "topk", "balancer": "none",
                               "num_classes": 6, "dim": 8}
    for kwargs, message in (({"lr": 0.0}, "lr=0.0 is out of range"),
                            ({"router_init": "xavier"}, "router_init='xavier' is not supported"),
                            ({"dim": 0}, "dim=0 is out of range")):
        with pytest.raises(ValueError, match=message):
            Clusters(0, **kwargs)


def test_router_init_rules():
    gates = {how: Clusters(0, router_init=how).build("topk", {}, {}, 0).router.gate.weight.detach()
             for how in ("zero", "normal", "uniform")}
    assert float(gates["zero"].abs().max()) == 0.0
    assert float(gates["normal"].std()) == pytest.approx(ROUTER_STD, rel=0.25)
    bound = 1 / math.sqrt(16)  # nn.Linear's U(-1/sqrt(D), 1/sqrt(D))
    assert 0.5 * bound < float(gates["uniform"].abs().max()) <= bound
    # the default (zero) keeps today's model exactly: same experts as the normal init's
    a = Clusters(0).build("dense", {}, {}, 3)
    b = Clusters(0, router_init="normal").build("dense", {}, {}, 3)
    assert torch.equal(a.experts.w1, b.experts.w1)


def test_clusters_shifted_moves_centres_and_teachers_by_the_angle():
    task = Clusters(0)
    new = task.shifted()
    again = Clusters(0).shifted()
    assert torch.equal(new.centres, again.centres) and torch.equal(new.val_target, again.val_target)
    cos = (new.centres * task.centres).sum(1) / (task.centres.norm(dim=1) * new.centres.norm(dim=1))
    assert torch.allclose(cos, torch.full((4,), math.cos(math.pi / 4)), atol=1e-6)
    assert torch.allclose(new.centres.norm(dim=1), torch.full((4,), 3.0), atol=1e-5)
    assert new.val_target.pow(2).mean().item() == pytest.approx(1.0, rel=0.1)
    assert not torch.equal(new.w1, task.w1)
    # a teacher entry is cos a * old + sin a * fresh: its correlation with the old one is ~cos a
    flat_old, flat_new = task.w1.flatten(), new.w1.flatten()
    corr = torch.corrcoef(torch.stack([flat_old, flat_new]))[0, 1]
    assert float(corr) == pytest.approx(math.cos(math.pi / 4), abs=0.05)
    assert new.settings() == task.settings() and new.config()["shift"] == pytest.approx(math.pi / 4)
    x_old, _, _ = task.batch(0)
    x_new, _, _ = new.batch(0)
    assert not torch.equal(x_old, x_new)  # a new batch stream
    with pytest.raises(ValueError, match="angle"):
        task.shifted(angle=2.0)


def test_charlm_knobs_and_shifted_text():
    cls = get_task("charlm")
    task = cls(0, dim=16, heads=4, layers=1, context=16, num_experts=4, batch_size=4,
               val_batches=2)
    assert task.settings() == {"task": "charlm", "top_k": 2, "num_experts": 4,
                               "router_init": "uniform", "lr": 0.003, "routing": "topk", "balancer": "none",
                               "layers": 1, "dim": 16}
    assert task.hidden_dim == 16  # the width sets the experts' hidden size too
    new = task.shifted()
    assert new.vocab == task.vocab and new.corpus == "stdlib"
    assert new.settings() == task.settings()
    itos = {i: c for c, i in task.stoi.items()}
    text = "".join(itos[int(i)] for i in new.val[0][0][0])
    assert len(text) == 16
    assert any(tok in "".join(itos[int(i)] for i in new.train_data[:5000]) for tok in ("def ", "import "))
    model = new.build("topk", {}, {}, 0)
    assert new.evaluate(model)["val_loss"] == pytest.approx(math.log(task.vocab), rel=0.1)
    with pytest.raises(ValueError, match="dim=18 must be a multiple of heads=4"):
        cls(0, dim=18)


@pytest.mark.parametrize("limit", [0, 3 * 256 * 33, 1 << 25])
def test_batch_stream_is_the_same_whatever_is_cached(limit):
    """Every reset replays the same stream, whether batches come from memory (limit large),
    from the generator (limit 0), or from memory and then the generator (3 batches fit)."""
    plain = Clusters(0)
    plain.cache_elements = 0
    cached = Clusters(0)
    cached.cache_elements = limit
    plain.reset()
    expected = [plain.batch(i) for i in range(6)]
    for length in (2, 6, 4, 6):  # runs of different lengths, each after a reset
        cached.reset()
        got = [cached.batch(i) for i in range(length)]
        for (x, c, t), (ex, ec, et) in zip(got, expected):
            assert torch.equal(x, ex) and torch.equal(c, ec) and torch.equal(t, et)
    shifted = cached.shifted()
    shifted.reset()
    assert not torch.equal(shifted.batch(0)[0], expected[0][0])  # its own stream, not the cache
