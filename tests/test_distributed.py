"""Expert parallelism (moegrad.distributed) against a single-process reference.

One group of 2 and one group of 4 gloo processes (CPU, loopback, 20 s collective timeout, the
spawn itself bounded) run every check once (module-scoped fixtures); each rank writes the
largest differences it measured and the tests assert on them.

Reference, computed on every rank from the same seeds: the plain MoE applied to each rank q's
tokens x_q (same sampling generator seed, capacity per rank), with the total loss
    sum_q <c_q, y_q> + W * sum_name coef * loss_name(all ranks' tokens concatenated),
since each rank returns its share of the global balance loss (their mean is the global loss).
Its gradients are then compared with the expert-parallel run: outputs y_r, input gradients
dL/dx_r, the local slice of the expert gradients, and the router gradients summed over ranks.
The same groups check that bad input (shape, dtype, grad mode) raises on every rank, and the
switch loss with a BalanceWindow over 2 micro-batches. A third group of 2 checks that ranks
disagreeing on the layer's settings (estimator and options, losses, top_k, ...) all raise a
ValueError naming them within seconds, instead of waiting for the collective timeout.
(``moegrad bench --world-size``: tests/bench/test_expert_parallel.py.)
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time

import pytest
import torch

import moegrad
from moegrad._testing import rank_results
from moegrad.dispatch import expert_capacity, plan_dispatch
from moegrad.losses import balance_losses
from moegrad.routing import Routing

TOL = 1e-5
D, H, S = 8, 12, 5
GROUP_TIMEOUT_S = 20.0
SPAWN_TIMEOUT_S = 150.0
MISMATCH_SPAWN_TIMEOUT_S = 90.0

#: name -> (estimator, options, losses, capacity_factor, activation, training)
CASES = {
    "topk": ("topk", {}, {"switch": 0.1, "z_loss": 0.01}, None, "swiglu", True),
    "topk_normalize_gelu": ("topk", {"normalize": True}, {"switch": 0.1}, None, "gelu", True),
    "topk_capacity": ("topk", {}, {"switch": 0.1}, 0.75, "swiglu", True),
    "unweighted": ("unweighted", {}, {"switch": 0.1}, None, "swiglu", True),
    "straight_through": ("straight_through", {}, {"seq_aux": 0.1}, None, "swiglu", True),
    "dense": ("dense", {"chunk_tokens": 3}, {"switch": 0.1}, None, "swiglu", True),
    "dense_capacity": ("dense", {}, {"switch": 0.1}, 1.0, "swiglu", True),
    "dense_normalize": ("dense", {"normalize": True, "chunk_tokens": 2}, {"switch": 0.1}, None, "swiglu", True),
    "default_moe": ("default_moe", {"beta": 0.5}, {"switch": 0.1}, None, "swiglu", True),
    "default_moe_forward": ("default_moe", {"forward_defaults": True}, {"z_loss": 0.1}, None, "swiglu", True),
    "gumbel": ("gumbel", {"tau": 0.7}, {"switch": 0.1}, None, "swiglu", True),
    "noisy_topk": ("noisy_topk", {}, {"importance_load": 0.1, "switch": 0.1}, None, "swiglu", True),
    "sparsemixer": ("sparsemixer", {}, {"z_loss": 0.1}, None, "swiglu", True),
    "sparsemixer_eval": ("sparsemixer", {}, {"switch": 0.1}, None, "swiglu", False),
}
CASES4 = ("topk", "topk_capacity", "unweighted", "straight_through", "dense", "default_moe",
          "default_moe_forward", "noisy_topk", "gumbel", "sparsemixer")
SAMPLING = ("gumbel", "noisy_topk", "sparsemixer")


def _num_experts(world):
    return 8


def _inputs(q, world, empty_rank=False):
    """Rank q's tokens: B_q sequences of S tokens (B_q differs across ranks), a padding mask,
    and the upstream weights c_q of the task loss <c_q, y_q>."""
    g = torch.Generator().manual_seed(1000 + q)
    b = 0 if (empty_rank and q == world - 1) else 1 + q % 2
    x = torch.randn(b, S, D, generator=g)
    mask = torch.rand(b, S, generator=g) > 0.2
    c = torch.randn(b, S, D, generator=g)
    return x, mask, c


def _set_generator(moe, seed):
    est = moe.router.estimator
    if est.name in SAMPLING:
        est.generator = torch.Generator().manual_seed(seed)


def _concat(routings, seq_len):
    """One Routing over every rank's tokens (for the global balance losses)."""
    cat = lambda name: (None if getattr(routings[0], name) is None
                        else torch.cat([getattr(r, name) for r in routings]))
    num = sum(r.num_tokens for r in routings)
    return Routing(logits=cat("logits"), scores=cat("scores"), indices=cat("indices"),
                   weights=cat("weights"), shape=(num // seq_len, seq_len), mask=cat("mask"),
                   load_probs=cat("load_probs"), noise_std=cat("noise_std"))


def _grad(p):
    return torch.zeros_like(p) if p.grad is None else p.grad


def _maxdiff(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _run_case(name, rank, world, same_inputs=False, empty_rank=False, skewed=False):
    import torch.distributed as dist
    from moegrad.distributed import expert_parallel

    estimator, options, losses, capacity, activation, training = CASES[name]
    options = dict(options)
    normalize = options.pop("normalize", False)
    num_experts = _num_experts(world)
    torch.manual_seed(7)
    moe = moegrad.MoE(D, H, num_experts, 2, estimator=estimator, normalize=normalize, losses=losses,
                      capacity_factor=capacity, activation=activation, selection_bias=skewed,
                      **options)
    if skewed:  # every token picks rank 0's experts: the other ranks receive no rows at all
        with torch.no_grad():
            moe.router.bias[num_experts // world:] = -100.0
    est = moe.router.estimator
    if estimator == "default_moe":  # a non-trivial EMA state, identical on every rank
        with torch.no_grad():
            est.defaults.copy_(torch.randn(num_experts, D, generator=torch.Generator().manual_seed(3)))
            est.seen[: num_experts // 2] = True
    moe.train(training)
    ref = copy.deepcopy(moe)
    inputs = [_inputs(0 if same_inputs else q, world, empty_rank) for q in range(world)]

    # --- reference on one process
    ref_est = ref.router.estimator
    old_defaults = ref_est.defaults.clone() if estimator == "default_moe" else None
    if estimator == "default_moe" and training:
        # the expert-parallel layer observes once with every rank's rows: do the same here
        with torch.no_grad():
            sums = torch.zeros(num_experts, D)
            counts = torch.zeros(num_experts, dtype=torch.int64)
            for q, (x, mask, _) in enumerate(inputs):
                _set_generator(ref, 500 + q)
                r = ref.router(x, mask)
                flat = x.reshape(-1, D)
                real = int(r.mask.sum()) if r.mask is not None else flat.shape[0]
                cap = None if capacity is None else expert_capacity(capacity, real, 2, num_experts)
                plan = plan_dispatch(r.indices, r.weights, num_experts, cap, keep=r.mask)  # padding left out
                every = ref.experts.every_expert(flat, ref.experts.stacked_weights())  # [T, E, D]
                sums.index_add_(0, plan.experts, every[plan.tokens, plan.experts])
                counts += plan.counts
            ref_est.observe(sums, counts)
            ref_est.observe = lambda *a: None
            expected_defaults = ref_est.defaults.clone()
    xs_ref, outs_ref, total = [], [], torch.zeros(())
    for q, (x, mask, c) in enumerate(inputs):
        _set_generator(ref, 500 + q)
        # an empty x does not require grad: dispatch.gather_rows' backward cannot reshape 0 tokens
        xq = x.clone().requires_grad_(x.shape[0] > 0)
        out = ref(xq, mask)
        xs_ref.append(xq)
        outs_ref.append(out)
        total = total + (out.y * c).sum()
    glob, glob_values = balance_losses(_concat([o.routing for o in outs_ref], S), ref.losses)
    total = total + world * glob
    total.backward()

    # --- expert parallel
    ep = expert_parallel(moe)
    _set_generator(ep, 500 + rank)
    x, mask, c = inputs[rank]
    x = x.clone().requires_grad_(x.shape[0] > 0)
    out = ep(x, mask)
    ((out.y * c).sum() + out.aux_loss).backward()

    res = {"y": _maxdiff(out.y, outs_ref[rank].y), "x_grad": _maxdiff(_grad(x), _grad(xs_ref[rank]))}
    lo, hi = ep.experts.first, ep.experts.first + ep.experts.num_local
    res["expert_grad"] = max(_maxdiff(_grad(getattr(ep.experts.local, n)), _grad(getattr(ref.experts, n))[lo:hi])
                             for n in ("w1", "w3", "w2") if getattr(ref.experts, n) is not None)
    res["expert_grad_norm"] = float(sum(_grad(p).norm() for p in ep.experts.parameters()))
    router_diff = 0.0
    for (_, p), (_, p_ref) in zip(ep.router.named_parameters(), ref.router.named_parameters()):
        g = _grad(p).clone()
        dist.all_reduce(g)
        router_diff = max(router_diff, _maxdiff(g, _grad(p_ref)))
    res["router_grad"] = router_diff
    res["router_grad_norm"] = float(_grad(ref.router.gate.weight).norm())
    aux = out.aux_loss.detach().clone()
    dist.all_reduce(aux)
    res["aux_mean"] = float(aux) / world
    res["aux_ref"] = float(glob.detach())
    res["aux_local"] = float(out.aux_loss.detach())
    res["losses"] = {}
    for key, value in out.losses.items():
        v = value.detach().clone()
        dist.all_reduce(v)
        res["losses"][key] = [float(v) / world, float(glob_values[key].detach())]
    if estimator == "default_moe":
        d = ep.router.estimator.defaults
        spread = d.clone()
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        low = d.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        res["defaults_spread"] = _maxdiff(spread, low)
        if training:
            res["defaults"] = _maxdiff(d, expected_defaults)
            res["defaults_moved"] = _maxdiff(d, old_defaults)
    res["stats_tokens"] = [int(v) for v in out.stats.tokens_per_expert]
    res["dropped"] = int(out.stats.dropped)
    return res


def _bad_input_checks(rank, world):
    """One rank sends something wrong; every rank must raise (and nobody hangs)."""
    from moegrad.distributed import expert_parallel

    torch.manual_seed(7)
    ep = expert_parallel(moegrad.MoE(D, H, _num_experts(world), 2))
    res = {}
    # 1) the exchange itself: rank 1 sends rows with the wrong feature size
    counts = torch.zeros(ep.num_experts, dtype=torch.int64)
    counts[0] = 3
    rows = torch.randn(3, D + 1 if rank == 1 else D)
    try:
        ep.experts(rows, counts)
        res["rows_dim"] = None
    except ValueError as err:
        res["rows_dim"] = str(err)
    # 2) rank 0's counts do not add up to its rows
    bad = counts.clone()
    bad[1] = 5 if rank == 0 else 0
    try:
        ep.experts(torch.randn(3, D), bad)
        res["counts"] = None
    except ValueError as err:
        res["counts"] = str(err)
    # 3) the layer: the last rank calls it with the wrong feature size
    x = torch.randn(4, D + 2 if rank == world - 1 else D)
    try:
        ep(x)
        res["layer"] = None
    except ValueError as err:
        res["layer"] = str(err)
    # 4) rank 0 calls the layer under no_grad, the others with grad enabled: without the check
    #    the forward passes, then only the grad ranks run the backward exchanges and wait
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(rank))
    try:
        with torch.no_grad() if rank == 0 else contextlib.nullcontext():
            ep(x)
        res["grad_mode"] = None
    except ValueError as err:
        res["grad_mode"] = str(err)
    # 5) the last rank froze its router copy (and x does not require grad): its scores need no grad
    ep.router.gate.weight.requires_grad_(rank != world - 1)
    try:
        ep(x)
        res["scores_grad"] = None
    except ValueError as err:
        res["scores_grad"] = str(err)
    ep.router.gate.weight.requires_grad_(True)
    # 6) the group still works afterwards
    out = ep(torch.randn(4, D, generator=torch.Generator().manual_seed(rank)))
    res["after"] = list(out.y.shape)
    return res


def _misc_checks(rank, world):
    import torch.distributed as dist
    from moegrad.distributed import (average_expert_grads, expert_parallel,
                                     expert_parameter_names, full_state_dict, load_full_state_dict)
    from moegrad.estimators.weighted import TopK

    res = {}
    # E not divisible by W
    try:
        expert_parallel(moegrad.MoE(D, H, world + 1, 1))
        res["divisible"] = None
    except ValueError as err:
        res["divisible"] = str(err)
    # an estimator nobody checked under expert parallelism is refused
    class Custom(TopK):
        name = "custom"

    torch.manual_seed(7)
    moe = moegrad.MoE(D, H, _num_experts(world), 2)
    moe.router.estimator = Custom(moe.router.config)
    try:
        expert_parallel(moe)
        res["estimator"] = None
    except ValueError as err:
        res["estimator"] = str(err)
    # different parameters on the ranks
    torch.manual_seed(7 + rank)
    try:
        expert_parallel(moegrad.MoE(D, H, _num_experts(world), 2))
        res["identical"] = None
    except ValueError as err:
        res["identical"] = str(err)
    # save/load: gather to the single-process layout and back
    torch.manual_seed(7)
    moe = moegrad.MoE(D, H, _num_experts(world), 2)
    plain = copy.deepcopy(moe)
    ep = expert_parallel(moe)
    full = full_state_dict(ep)
    ref_state = plain.state_dict()
    res["state_keys"] = sorted(full) == sorted(ref_state)
    res["state_diff"] = max(_maxdiff(full[k].float(), ref_state[k].float()) for k in ref_state)
    res["expert_names"] = expert_parameter_names(ep)
    torch.manual_seed(11)
    fresh_ep = expert_parallel(moegrad.MoE(D, H, _num_experts(world), 2))
    load_full_state_dict(fresh_ep, plain.state_dict())
    lo, hi = fresh_ep.experts.first, fresh_ep.experts.first + fresh_ep.experts.num_local
    res["load_diff"] = max(_maxdiff(fresh_ep.experts.local.w1, plain.experts.w1[lo:hi]),
                           _maxdiff(fresh_ep.router.gate.weight, plain.router.gate.weight))
    # average_expert_grads divides the summed expert gradient by W
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(rank))
    ep.zero_grad()
    ep(x).y.sum().backward()
    before = ep.experts.local.w1.grad.clone()
    average_expert_grads(ep)
    res["average"] = _maxdiff(ep.experts.local.w1.grad * world, before)
    # bytes counted by ExchangeStats: one header, then 2 row exchanges forward and 2 backward
    ep.zero_grad()
    ep.experts.stats.reset()
    out = ep(x)
    out.y.sum().backward()
    counts = out.stats.tokens_per_expert.clone()
    lo, hi = ep.experts.first, ep.experts.first + ep.experts.num_local
    glob = counts.clone()
    dist.all_reduce(glob)
    sent = int(counts.sum() - counts[lo:hi].sum())  # my rows for other ranks' experts
    returned = int(glob[lo:hi].sum() - counts[lo:hi].sum())  # other ranks' rows I compute
    expected = (world - 1) * (3 + hi - lo) * 8 + 2 * (sent + returned) * D * 4
    res["bytes"] = [ep.experts.stats.reset(), expected, sent + returned]
    # auxiliary-loss-free balancing: every rank applies the update from the global loads
    torch.manual_seed(7)
    moe = moegrad.MoE(D, H, _num_experts(world), 2, selection_bias=True)
    ep = expert_parallel(moe)
    balancer = moegrad.BiasBalancer(ep, gamma=0.1)
    ep(torch.randn(5 + 3 * rank, D, generator=torch.Generator().manual_seed(rank)))
    glob = ep.router.load_counts.clone()
    dist.all_reduce(glob)
    balancer.step()
    expected = 0.1 * torch.sign(glob.float().mean() - glob.float())
    res["bias"] = _maxdiff(ep.router.bias, expected)
    return res


def _window_inputs(q, m):
    """Rank q's micro-batch m: [T, D] tokens (T differs across ranks and micro-batches), a mask."""
    g = torch.Generator().manual_seed(3000 + 10 * m + q)
    x = torch.randn(4 + 3 * q + m, D, generator=g)
    return x, torch.rand(x.shape[0], generator=g) > 0.2


def _window_checks(rank, world, micro=2):
    """Gradient accumulation with a BalanceWindow: ``micro`` micro-batches per rank, against a
    reference on one process from every rank's tokens: at micro-batch m,
        switch = E * sum_i f_i P_i,  f from all W x (m + 1) shards so far, P from micro-batch m."""
    import torch.distributed as dist
    from moegrad.distributed import expert_parallel
    from moegrad.balancing import BalanceWindow

    num_experts = _num_experts(world)
    torch.manual_seed(7)
    moe = moegrad.MoE(D, H, num_experts, 2, losses={"switch": 1.0})
    ref = copy.deepcopy(moe)
    ep = expert_parallel(moe)
    window = BalanceWindow(ep)
    shards = [[_window_inputs(q, m) for q in range(world)] for m in range(micro)]
    res = {"aux_mean": [], "aux_ref": [], "aux_local": [], "share_ref": [], "no_window": [],
           "router_grad": [], "router_grad_norm": []}
    for m in range(micro):
        x, mask = shards[m][rank]
        ep.zero_grad()
        out = ep(x, mask)
        out.aux_loss.backward()
        aux = out.aux_loss.detach().clone()
        dist.all_reduce(aux)
        grad = ep.router.gate.weight.grad.clone()
        dist.all_reduce(grad)
        # reference on one process: f from every shard of micro-batches 0..m, P from micro-batch m
        ref.zero_grad()
        routed = [[ref.router(xq, mq) for xq, mq in shards[j]] for j in range(m + 1)]
        assigned = lambda rs, ms: torch.cat([torch.nn.functional.one_hot(r.indices, num_experts).sum(1)[mq]
                                             for r, mq in zip(rs, ms)]).float()  # [real tokens, E]
        every = assigned([r for rs in routed for r in rs], [mq for sh in shards[:m + 1] for _, mq in sh])
        f = every.sum(0) / every.shape[0]
        last_masks = [mq for _, mq in shards[m]]
        norm = [(r.scores / r.scores.sum(-1, keepdim=True))[mq] for r, mq in zip(routed[m], last_masks)]
        n_last = sum(int(mq.sum()) for mq in last_masks)
        p = torch.cat(norm).sum(0) / n_last
        loss_ref = num_experts * (f * p).sum()
        loss_ref.backward()
        # this rank's share: the global P is W x the mean of the ranks' shares, so no factor W
        share = num_experts * (f.detach() * world * norm[rank].detach().sum(0) / n_last).sum()
        f_now = assigned(routed[m], last_masks)
        res["no_window"].append(float(num_experts * (f_now.sum(0) / f_now.shape[0] * p.detach()).sum()))
        res["aux_mean"].append(float(aux) / world)
        res["aux_ref"].append(float(loss_ref.detach()))
        res["aux_local"].append(float(out.aux_loss.detach()))
        res["share_ref"].append(float(share))
        res["router_grad"].append(_maxdiff(grad / world, ref.router.gate.weight.grad))
        res["router_grad_norm"].append(float(ref.router.gate.weight.grad.norm()))
    res["fractions"] = _maxdiff(window.fractions()[0], f.double())
    res["window_tokens"] = [int(ep.balance_window[-1]),
                            sum(int(mq.sum()) for sh in shards for _, mq in sh)]
    res["finished"] = _maxdiff(window.reset()[0], f.double())
    res["after_reset"] = int(ep.balance_window.abs().sum())
    return res


#: ranks that disagree on a setting: name -> (rank 0's MoE options, rank 1's changes, whether
#: rank 1 changes them after expert_parallel (caught at the next forward's entry check) or builds
#: its MoE with them (caught by expert_parallel), the fields the error must name, and the part of
#: it that gives every rank's value). Without the check these either hang in mismatched
#: collectives until the process-group timeout, end in a gloo error, or silently run other maths.
MISMATCHES = {
    "estimator": ({}, {"estimator": "gumbel"}, False, ["estimator"],
                  "estimator: 'topk' on rank(s) [0], 'gumbel' on rank(s) [1]"),
    "estimator_option": ({"estimator": "gumbel", "tau": 1.0}, {"tau": 0.5}, False, ["estimator option tau"],
                         "estimator option tau: 1.0 on rank(s) [0], 0.5 on rank(s) [1]"),
    "losses": ({}, {"losses": {"switch": 0.1, "z_loss": 0.01}}, False, ["losses"],
               "losses: [['switch', 0.1]] on rank(s) [0], [['switch', 0.1], ['z_loss', 0.01]] on rank(s) [1]"),
    "losses_order": ({"losses": {"switch": 0.1, "z_loss": 0.01}}, {"losses": {"z_loss": 0.01, "switch": 0.1}},
                     False, ["losses"], "losses: [['switch', 0.1], ['z_loss', 0.01]] on rank(s) [0], "
                                        "[['z_loss', 0.01], ['switch', 0.1]] on rank(s) [1]"),
    "top_k": ({}, {"top_k": 1}, False, ["top_k"], "top_k: 2 on rank(s) [0], 1 on rank(s) [1]"),
    "capacity_factor": ({}, {"capacity_factor": 1.0}, False, ["capacity_factor"],
                        "capacity_factor: None on rank(s) [0], 1.0 on rank(s) [1]"),
    "normalize": ({}, {"normalize": True}, False, ["normalize"],
                  "normalize: False on rank(s) [0], True on rank(s) [1]"),
    "routing": ({}, {"routing": "sinkhorn"}, False, ["routing"],
                "routing: 'topk' on rank(s) [0], 'sinkhorn' on rank(s) [1]"),
    "losses_changed": ({}, {"losses": {"z_loss": 0.01}}, True, ["losses"],
                       "losses: [['switch', 0.1]] on rank(s) [0], [['z_loss', 0.01]] on rank(s) [1]"),
    "estimator_option_changed": ({"estimator": "gumbel"}, {"tau": 0.5}, True, ["estimator option tau"],
                                 "estimator option tau: 1.0 on rank(s) [0], 0.5 on rank(s) [1]"),
    "capacity_factor_changed": ({}, {"capacity_factor": 0.5}, True, ["capacity_factor"],
                                "capacity_factor: None on rank(s) [0], 0.5 on rank(s) [1]"),
    "generator_changed": ({"estimator": "sparsemixer"}, {"generator": "seeded"}, True,
                          ["estimator option generator"],
                          "estimator option generator: None on rank(s) [0], '<torch.Generator>' on rank(s) [1]"),
}
#: settings that may differ (or only look different): name -> (rank 0's options, rank 1's changes)
AGREEMENTS = {
    # a generator per rank, seeded differently (as the module docstring recommends)
    "generators_seeded_per_rank": ({"estimator": "sparsemixer", "generator": "seeded"}, {}),
    "int_and_float_capacity": ({"capacity_factor": 1}, {"capacity_factor": 1.0}),
}


def _settings_case(rank, world, options, changes, later):
    """Build the MoE with ``options`` (rank 1 applies ``changes`` before or after expert_parallel),
    run one forward and backward; -> the error raised (type, message) and the seconds it took."""
    from moegrad.distributed import expert_parallel

    def resolve(opts):
        return {k: torch.Generator().manual_seed(100 + rank) if v == "seeded" else v for k, v in opts.items()}

    options = {"losses": {"switch": 0.1}, **resolve(options)}
    if rank == 1 and not later:
        options.update(resolve(changes))
    top_k = options.pop("top_k", 2)
    torch.manual_seed(7)
    moe = moegrad.MoE(D, H, _num_experts(world), top_k, **options)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(rank))
    start = time.monotonic()
    try:
        ep = expert_parallel(moe)
        if rank == 1 and later:
            for key, value in resolve(changes).items():
                setattr(ep if key in ("losses", "capacity_factor") else ep.router.estimator, key, value)
        out = ep(x)
        (out.y.sum() + out.aux_loss).backward()
        return {"error": None, "seconds": time.monotonic() - start, "y": list(out.y.shape),
                "router_grad": float(ep.router.gate.weight.grad.abs().sum())}
    except Exception as err:  # noqa: BLE001 - the test asserts on the type
        return {"error": type(err).__name__, "message": str(err), "seconds": time.monotonic() - start}


def _mismatch_worker(rank, world, port, out_dir):
    """Every MISMATCHES and AGREEMENTS case in one 2-process group; after an error other than the
    expected ValueError the group may be out of step, so the remaining cases are not run."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    from moegrad._testing import init_process_group_for_tests

    init_process_group_for_tests(rank, world, port, GROUP_TIMEOUT_S)
    with rank_results(out_dir, rank) as results:
        cases = [(n, o, c, later) for n, (o, c, later, _, _) in MISMATCHES.items()]
        cases += [(n, o, c, False) for n, (o, c) in AGREEMENTS.items()]
        for name, options, changes, later in cases:
            results[name] = _settings_case(rank, world, options, changes, later)
            if results[name]["error"] not in (None, "ValueError"):
                break


def _worker(rank, world, port, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    from moegrad._testing import init_process_group_for_tests

    init_process_group_for_tests(rank, world, port, GROUP_TIMEOUT_S)
    with rank_results(out_dir, rank) as results:
        names = CASES if world == 2 else CASES4
        for name in names:
            results[name] = _run_case(name, rank, world)
        results["same_inputs"] = _run_case("topk", rank, world, same_inputs=True)
        results["empty_rank"] = _run_case("topk", rank, world, empty_rank=True)
        results["empty_rank_dense"] = _run_case("dense", rank, world, empty_rank=True)
        results["skewed"] = _run_case("topk", rank, world, skewed=True)
        results["bad"] = _bad_input_checks(rank, world)
        results["window"] = _window_checks(rank, world)
        results["misc"] = _misc_checks(rank, world)



def _run_group(world, tmp_path_factory, worker=None, timeout_s=SPAWN_TIMEOUT_S):
    from moegrad._testing import free_port, spawn_and_wait

    out_dir = str(tmp_path_factory.mktemp(f"ep{world}"))
    spawn_and_wait(worker or _worker, (world, free_port(), out_dir), world, timeout_s,
                   f"the {world}-process group")
    out = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            out.append(json.load(f))
    return out


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    return _run_group(2, tmp_path_factory)


@pytest.fixture(scope="module")
def ep4(tmp_path_factory):
    return _run_group(4, tmp_path_factory)


def _assert_case(results, name):
    for rank, res in enumerate(results):
        r = res[name]
        for key in ("y", "x_grad", "expert_grad", "router_grad"):
            assert r[key] < TOL, f"{name} rank {rank}: {key} differs by {r[key]:.3g}"
        assert abs(r["aux_mean"] - r["aux_ref"]) < TOL, (name, rank, r["aux_mean"], r["aux_ref"])
        for key, (mean, ref) in r["losses"].items():
            assert abs(mean - ref) < TOL, (name, rank, key, mean, ref)
        assert r["router_grad_norm"] > 1e-3  # the comparison is not vacuous
    assert sum(res[name]["expert_grad_norm"] for res in results) > 1e-3


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_ranks_match_single_process(ep2, name):
    _assert_case(ep2, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES4)
def test_four_ranks_match_single_process(ep4, name):
    _assert_case(ep4, name)


@pytest.mark.parametrize("name", ["empty_rank", "empty_rank_dense", "skewed"])
@pytest.mark.parametrize("world", [2, 4])
def test_rank_without_tokens(ep2, ep4, name, world):
    results = ep2 if world == 2 else ep4
    _assert_case(results, name)
    if name == "skewed":  # nothing routed to the experts of ranks 1..W-1
        assert all(sum(res[name]["stats_tokens"][8 // world:]) == 0 for res in results)
    else:
        assert sum(results[-1][name]["stats_tokens"]) == 0


def test_dense_renormalised_under_two_ranks_matches_single_process(ep2):
    """dense with normalize=True: the unselected experts' router gradient c <g, E_i(x)> / sum_S s
    (DenseMixer's weight) is the same with the experts sharded over 2 ranks as on one process."""
    _assert_case(ep2, "dense_normalize")


def test_capacity_drops_per_rank(ep2):
    assert sum(res["topk_capacity"]["dropped"] for res in ep2) > 0
    assert sum(res["dense_capacity"]["dropped"] for res in ep2) > 0


@pytest.mark.parametrize("world", [2, 4])
def test_balance_loss_has_no_world_size_factor(ep2, ep4, world):
    """Every rank sees the same tokens: each rank's aux loss must equal the single-process one
    (not W times it), and so must the mean over ranks."""
    results = ep2 if world == 2 else ep4
    for res in results:
        r = res["same_inputs"]
        assert abs(r["aux_local"] - r["aux_ref"]) < TOL, (world, r["aux_local"], r["aux_ref"])
        assert r["aux_ref"] > 0.1


@pytest.mark.parametrize("world", [2, 4])
def test_default_moe_buffers_identical_and_global(ep2, ep4, world):
    results = ep2 if world == 2 else ep4
    for res in results:
        r = res["default_moe"]
        assert r["defaults_spread"] == 0.0
        assert r["defaults"] < TOL
        assert r["defaults_moved"] > 1e-3


@pytest.mark.parametrize("world", [2, 4])
def test_bad_shape_raises_on_every_rank(ep2, ep4, world):
    results = ep2 if world == 2 else ep4
    for rank, res in enumerate(results):
        b = res["bad"]
        assert b["rows_dim"] is not None and "rank(s) [1]" in b["rows_dim"], (rank, b["rows_dim"])
        assert b["counts"] is not None and "rank(s) [0]" in b["counts"], (rank, b["counts"])
        assert b["layer"] is not None and f"rank(s) [{world - 1}]" in b["layer"], (rank, b["layer"])
        assert b["grad_mode"] is not None and "rank(s) [0]" in b["grad_mode"], (rank, b["grad_mode"])
        assert "torch.no_grad()" in b["grad_mode"] and "same grad mode" in b["grad_mode"]
        assert b["scores_grad"] is not None and f"rank(s) [{world - 1}]" in b["scores_grad"], b["scores_grad"]
        assert "freeze it" in b["scores_grad"]
        assert b["after"] == [4, D]
    assert "feature size 10" in results[-1]["bad"]["layer"]


@pytest.mark.parametrize("world", [2, 4])
def test_conversion_errors_and_state_dicts(ep2, ep4, world):
    results = ep2 if world == 2 else ep4
    for res in results:
        m = res["misc"]
        assert m["divisible"] is not None and f"num_experts={world + 1}" in m["divisible"]
        assert m["estimator"] is not None and "'custom'" in m["estimator"]
        assert m["identical"] is not None and "differs across ranks" in m["identical"]
        assert m["state_keys"] and m["state_diff"] == 0.0
        assert m["load_diff"] == 0.0
        assert m["expert_names"] == ["experts.local.w1", "experts.local.w3", "experts.local.w2"]
        assert m["average"] < 1e-6
        assert m["bias"] < 1e-7
        measured, expected, rows = m["bytes"]
        assert rows > 0 and measured == expected


@pytest.mark.parametrize("world", [2, 4])
def test_balance_window_accumulates_counts_over_ranks_and_micro_batches(ep2, ep4, world):
    """At micro-batch m each rank's switch loss is its share of E sum_i f_i P_i with f over all
    W x (m + 1) shards (at the last one: the whole window) and P over micro-batch m: the mean over
    ranks equals the one-process reference (no factor W), so does the router gradient."""
    results = ep2 if world == 2 else ep4
    for rank, res in enumerate(results):
        w = res["window"]
        for m in range(2):
            assert abs(w["aux_mean"][m] - w["aux_ref"][m]) < TOL, (rank, m, w["aux_mean"], w["aux_ref"])
            assert abs(w["aux_local"][m] - w["share_ref"][m]) < TOL, (rank, m, w["aux_local"], w["share_ref"])
            assert w["router_grad"][m] < TOL and w["router_grad_norm"][m] > 1e-3
            assert w["aux_ref"][m] > 0.5  # about K = 2: a factor W would show
        # micro-batch 1 alone would give another f: the window changes the value
        assert abs(w["aux_ref"][1] - w["no_window"][1]) > 1e-4
        assert abs(w["aux_ref"][0] - w["no_window"][0]) < TOL  # first micro-batch: nothing earlier
        assert w["fractions"] < 1e-7 and w["finished"] < 1e-7
        assert w["window_tokens"][0] == w["window_tokens"][1] > 0
        assert w["after_reset"] == 0


@pytest.fixture(scope="module")
def settings2(tmp_path_factory):
    return _run_group(2, tmp_path_factory, _mismatch_worker, MISMATCH_SPAWN_TIMEOUT_S)


def _named_fields(message):
    """The fields a settings-mismatch error lists: '...: field: values; field: values. Expert ...'."""
    listed = message.split("): ", 1)[1].split(". Expert parallelism needs", 1)[0]
    return [part.split(": ", 1)[0] for part in listed.split("; ")]


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_settings_mismatch_raises_on_every_rank(settings2, name):
    """Ranks that disagree on one setting: every rank raises a ValueError naming that field and
    each rank's value, long before the 20 s process-group timeout (expert_parallel for settings
    built in, the next forward's entry check for settings changed afterwards)."""
    _, _, later, fields, values = MISMATCHES[name]
    for rank, res in enumerate(settings2):
        assert name in res, f"rank {rank}: not run, an earlier case broke the group: {res}"
        r = res[name]
        assert r["error"] == "ValueError", (rank, r)
        where = "expert-parallel MoE" if later else "expert_parallel"
        assert r["message"].startswith(f"{where}: the ranks disagree on the MoE's settings "
                                       f"(this is rank {rank} of 2): "), r["message"]
        assert _named_fields(r["message"]) == fields, r["message"]
        assert values in r["message"], r["message"]
        assert r["seconds"] < GROUP_TIMEOUT_S / 4, (rank, r["seconds"])


def test_settings_cover_every_router_field_and_compare_generators_by_presence():
    """The compared settings hold every RouterConfig field, the estimator's options, the losses in
    order; a generator counts only as set or not, 1 and 1.0 are the same value."""
    import dataclasses

    from moegrad.distributed import _digest, _settings
    from moegrad.routing import RouterConfig

    moe = moegrad.MoE(D, H, 4, 2, estimator="gumbel", tau=0.5, losses={"z_loss": 0.01, "switch": 0.1},
                      capacity_factor=1, generator=torch.Generator().manual_seed(1))
    got = _settings(moe)
    assert {f.name for f in dataclasses.fields(RouterConfig)} <= set(got)
    assert got["estimator"] == "gumbel" and got["estimator option tau"] == 0.5
    assert got["estimator option hard"] is False
    assert got["losses"] == [["z_loss", 0.01], ["switch", 0.1]]
    json.dumps(got)  # serialisable as it is gathered
    other = copy.deepcopy(moe)
    other.router.estimator.generator = torch.Generator().manual_seed(2)
    other.capacity_factor = 1.0
    assert _digest(_settings(other)) == _digest(got)
    other.router.estimator.generator = None
    assert _digest(_settings(other)) != _digest(got)
    other.router.estimator.generator = torch.Generator()
    other.router.estimator.tau = 0.5 + 2 ** -40  # floats compare exactly
    assert _digest(_settings(other)) != _digest(got)


@pytest.mark.parametrize("name", list(AGREEMENTS))
def test_settings_that_agree_pass_the_check(settings2, name):
    """Per-rank generators (only their presence is compared) and capacity 1 vs 1.0 are no
    mismatch: the forward and backward run (and the group still works after every error above)."""
    for rank, res in enumerate(settings2):
        r = res[name]
        assert r["error"] is None, (rank, r)
        assert r["y"] == [6, D] and r["router_grad"] > 1e-3


def test_expert_parallel_needs_an_initialised_group():
    import torch.distributed as dist
    from moegrad.distributed import expert_parallel

    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        expert_parallel(moegrad.MoE(D, H, 4, 2))
    with pytest.raises(TypeError, match="moegrad.MoE"):
        expert_parallel(torch.nn.Linear(2, 2))


def test_example_runs_under_torchrun_launcher():
    """examples/expert_parallel.py as the README launches it (2 gloo processes), briefly."""
    import re
    from pathlib import Path

    from moegrad._testing import run_torchrun

    example = Path(__file__).resolve().parents[1] / "examples" / "expert_parallel.py"
    res = run_torchrun(example, 2, ["--steps", 8, "--micro-batches", 2, "--timeout", 60], 180)
    assert res.returncode == 0, res.stderr[-2000:]
    first, last, diff = re.search(r"relative mse ([\d.]+) -> ([\d.]+); gathered model vs "
                                  r"expert-parallel model max \|diff\| ([\d.e+-]+)", res.stdout).groups()
    assert float(last) < float(first)
    assert float(diff) < 1e-5
