"""A study cell's routing and balancer settings: the estimators each takes, and the refusals."""

import pytest

from moegrad._spec import DETERMINISTIC
from moegrad.study.settings import Cell

COMMON = dict(quick=True, steps=2, seeds=1, time_budget=None, losses=None, eval_every=None,
              diag_every=None, diag_samples=1, tau=1.0, impl="auto", regime=None,
              pretrain_steps=None, options={})


def cell(names=None, **kw):
    return Cell("clusters", names, **{**COMMON, **kw})


def test_pair_routings_run_their_one_estimator_without_diagnostics():
    remoe = cell(routing="remoe")
    assert remoe.names == ["remoe"] and remoe.diag_every == 0
    assert "n/a under routing='remoe'" in remoe.na["diagnostics"]
    assert remoe.kwargs["router_init"] == "normal"  # a zero ReLU router never routes a token
    task = remoe.task(0)
    assert task.routing == "remoe" and task.router_init == "normal"
    model = task.build("remoe", {}, {}, 0)
    assert model.router.config.routing == "remoe" and model.router.estimator.name == "topk"
    ec = cell(routing="expert_choice")
    assert ec.names == ["topk"] and ec.diag_every == 0 and ec.losses == {}
    assert cell(routing="expert_choice", losses={"z_loss": 1e-3}).losses == {"z_loss": 1e-3}


def test_pair_routing_refusals_name_the_option():
    with pytest.raises(ValueError, match=r"--estimators topk cannot be combined with --routing remoe"):
        cell(["topk"], routing="remoe")
    with pytest.raises(ValueError, match=r"--routing expert_choice cannot be combined with the "
                                         r"estimator\(s\) \['dense'\] \(it takes estimator 'topk' only\)"):
        cell(["topk", "dense"], routing="expert_choice")
    for routing in ("remoe", "expert_choice"):
        with pytest.raises(ValueError, match=rf"--losses switch with --routing {routing}: this "
                                             r"routing takes the balance loss\(es\) \['z_loss'\] only"):
            cell(routing=routing, losses={"switch": 0.01})
    with pytest.raises(ValueError, match=r"--router-init zero with --routing remoe"):
        cell(routing="remoe", options={"router_init": "zero"})


def test_balancer_takes_topk_routing_and_the_deterministic_estimators():
    bias = cell(balancer="bias")
    assert bias.names == list(DETERMINISTIC) and bias.diag_every == 0
    assert "--balancer bias" in bias.na["diagnostics"]
    task = bias.task(0)
    assert task.balancer == "bias" and task.selection_bias is True
    assert task.build("topk", {}, {}, 0).router.config.selection_bias is True
    assert cell().task(0).selection_bias is False and cell().na == {}
    for routing in ("sinkhorn", "expert_choice", "remoe"):
        with pytest.raises(ValueError, match=rf"--balancer quantile needs --routing topk \(got {routing}\)"):
            cell(balancer="quantile", routing=routing)
    for sampler in ("gumbel", "noisy_topk", "sparsemixer"):
        with pytest.raises(ValueError, match=rf"\['{sampler}'\] \(they select by sampling and refuse "
                                             r"the selection_bias of --balancer bias\)"):
            cell(["topk", sampler], balancer="bias")
    with pytest.raises(ValueError, match=r"balancer='loss' is unknown; choose one of \['none', 'bias', 'quantile'\]"):
        cell(balancer="loss")
