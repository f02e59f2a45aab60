"""Expert parallelism over torch.distributed (gloo on CPU, NCCL on GPU).

Shapes: W ranks in the process group, r this rank, E experts in the model, L = E / W experts
on each rank, T tokens on this rank, D model dim, H hidden dim, K top-k, M (token, slot) rows
this rank sends (its kept pairs), R rows it receives for its own experts.

:func:`expert_parallel` turns a :class:`moegrad.MoE` built identically on every rank into its
expert-parallel form. Every rank keeps its own tokens (data parallel over the batch), the
router is replicated, and rank r holds experts [r L, (r + 1) L). One layer call does:

    entry check: all_reduce of [W, 6] int64 (input problem, dtype, modes, settings digest)
    route locally -> plan_dispatch (rows sorted by expert, counts [E])
    header exchange: all_to_all_single of [W, 3 + L] int64 (status, D, dtype, counts per expert)
    dispatch:  all_to_all_single of the rows, uneven splits   M rows out, R rows in
    regroup the R rows by local expert, run the L local experts
    combine:   all_to_all_single back (the splits reversed)   R rows out, M rows in
    combine_rows -> estimator.mix -> balance losses (global counts)

Gradients flow back through both exchanges (:func:`all_to_all_rows`, its backward is the
reverse exchange). Whenever grad mode is on, both exchanges are put in the autograd graph on
every rank (a rank without tokens included), so every rank runs the same collectives in the
same order in backward; call ``loss.backward()`` on every rank.

What is exact, and what is global:

* Outputs: rank r's output equals the single-process MoE applied to rank r's tokens (capacity,
  when set, is applied per rank to its own T tokens, as in GShard/Switch).
* Expert weights: their gradient is the sum over all ranks' tokens (the exchange sums them).
* Router and input gradients: the local ones; replicated parameters need the usual data-parallel
  reduction (DDP, which averages).
* Balance losses use the counts of all ranks of this micro-batch (all-reduced, no gradient). Each
  rank returns its share, scaled so that the mean over ranks of ``aux_loss`` is the loss of the
  whole micro-batch computed on one process: no factor W, and DDP's averaging of the router
  gradient gives exactly the global loss's gradient.
* Gradient accumulation: with :class:`moegrad.balancing.BalanceWindow` the ``switch`` loss's f
  comes from the counts of every rank and every micro-batch since the window's last ``reset()``
  (this one included), P from this micro-batch; at the last micro-batch f is the whole global
  batch's (all W ranks x M micro-batches). Divide each micro-batch's ``aux_loss`` by M like the
  task loss, call ``window.reset()`` after ``optimizer.step()``. Without a window each
  micro-batch's loss is global over the ranks for that micro-batch only.
* Expert weights are not replicated, so DDP must not touch them (:func:`ddp_ignore_experts`);
  as they receive the *sum* over ranks while DDP *averages* the replicated gradients, call
  :func:`average_expert_grads` after backward so both follow the same mean-over-ranks objective.

Estimators: ``topk``, ``unweighted``, ``straight_through``, ``gumbel``, ``noisy_topk`` and
``sparsemixer`` route each token on its own rank and need nothing more. Sampling ones draw from
each rank's generator (or the global RNG): as every rank seeds identically to build the model,
reseed per rank afterwards (e.g. ``torch.manual_seed(seed + rank)``) for independent noise.
``default_moe`` all-reduces its per-expert sums and counts before ``observe`` so its default
vectors stay identical on every rank (E * D fp32 per layer call in training). ``dense`` is
implemented exactly (:class:`ExpertParallelDense`): its backward all-gathers (x, dL/dy) of every
token, each rank evaluates its L experts on all W T tokens and returns the scores with an
all-to-all; see ``benchmarks/expert_parallel.md`` for its cost.

Modules: the collectives (:func:`all_to_all_rows`, :func:`all_reduce_share`,
:func:`all_reduce_detached`, :func:`reduce_observation`, :class:`ExchangeStats`, :func:`group_size`,
:func:`group_rank`) live in the leaf module :mod:`moegrad._collectives` and are re-exported here;
the layer, the balance losses and :class:`moegrad.balancing.BiasBalancer` use them from there,
so this module (the conversion, which imports the layer) is imported by none of them.

Saving and loading: ``module.state_dict()`` holds only the local slices (``experts.local.w1``
[L, H, D] ...). :func:`full_state_dict` gathers them into the single-process layout
(``experts.w1`` [E, H, D] ...) that a plain MoE loads; :func:`load_full_state_dict` loads such a
state dict into an expert-parallel model, keeping each rank's slice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moegrad._collectives import (ExchangeStats, all_reduce_detached, all_reduce_share,
                                  all_to_all_rows, group_rank, group_size, reduce_observation)
from moegrad._interfaces import ExpertWeights
from moegrad._moved import moved_names
from moegrad._spec import dense_chunk_tokens
from moegrad.estimators.dense import Dense, unselected_mask
from moegrad.experts import Experts, map_weights
from moegrad.layer import MoE
from moegrad.routing import flatten_mask, flatten_tokens

#: dtypes the exchange accepts, coded by their index in the header
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: estimators that route each token on its own rank and work unchanged under expert parallelism
LOCAL_ESTIMATORS = ("default_moe", "gumbel", "noisy_topk", "sparsemixer", "straight_through", "topk",
                    "unweighted")
#: estimators replaced by an expert-parallel version
CONVERTED_ESTIMATORS = ("dense",)


def _dtype_code(dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


# ---------------------------------------------------------------------------------------------
# the expert-parallel experts


class ExpertParallelExperts(nn.Module):
    """Rank r's slice of the experts plus the token exchange.

    ``forward(rows [M, D] sorted by expert, counts [E]) -> [M, D]``: the same contract as
    :meth:`moegrad.Experts.forward` for all E experts, computed where the experts live.
    Parameters: ``local.w1`` [L, H, D], ``local.w3`` [L, H, D] (SwiGLU), ``local.w2`` [L, D, H],
    experts ``first .. first + L - 1`` of the model. ``stats`` counts the bytes sent.
    """

    def __init__(self, experts: Experts, group=None) -> None:
        super().__init__()
        world, rank = group_size(group), group_rank(group)
        if experts.num_experts % world:
            raise ValueError(
                f"num_experts={experts.num_experts} is not divisible by {world}, the size of the "
                "expert-parallel process group: expert parallelism gives each of its W ranks E / W "
                "experts; choose num_experts a multiple of W (or a smaller group)")
        self.group, self.world, self.rank = group, world, rank
        self.dim, self.hidden_dim = experts.dim, experts.hidden_dim
        self.num_experts, self.activation = experts.num_experts, experts.activation
        self.num_local = experts.num_experts // world
        self.first = rank * self.num_local
        self.local = Experts(experts.dim, experts.hidden_dim, self.num_local, experts.activation,
                             experts.impl).to(device=experts.w1.device, dtype=experts.w1.dtype)
        with torch.no_grad():
            for name in ("w1", "w3", "w2"):
                full = getattr(experts, name)
                if full is not None:
                    getattr(self.local, name).copy_(full[self.first:self.first + self.num_local])
                    getattr(self.local, name).requires_grad_(full.requires_grad)
        self.stats = ExchangeStats()

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, world={self.world}, rank={self.rank}, "
                f"local_experts=[{self.first}, {self.first + self.num_local})")

    @property
    def impl(self) -> str:
        return self.local.impl

    def stacked_weights(self) -> ExpertWeights:
        """The local slices as :class:`~moegrad._interfaces.ExpertWeights` (gate, down, up), L experts each."""
        return self.local.stacked_weights()

    def every_expert(self, x: Tensor, weights: ExpertWeights) -> Tensor:
        raise RuntimeError(
            f"this rank holds only experts [{self.first}, {self.first + self.num_local}) of "
            f"{self.num_experts} (expert parallelism), so it cannot evaluate every expert on its "
            "tokens; gather the model with moegrad.distributed.full_state_dict and load it into a "
            "plain moegrad.MoE for that")

    def _header(self, rows, counts) -> tuple:
        """[W, 3 + L] int64 header per destination, and a local error message (or None)."""
        world, local = self.world, self.num_local
        device = rows.device if isinstance(rows, Tensor) else torch.device("cpu")
        header = torch.zeros(world, 3 + local, dtype=torch.int64, device=device)
        problem = None
        if not isinstance(rows, Tensor) or rows.dim() != 2:
            problem = f"rows must be a 2-d tensor [M, D], got {getattr(rows, 'shape', type(rows))}"
        elif not isinstance(counts, Tensor) or counts.shape != (self.num_experts,):
            problem = (f"counts must be a tensor of shape [{self.num_experts}], got "
                       f"{tuple(counts.shape) if isinstance(counts, Tensor) else type(counts)}")
        elif counts.is_floating_point() or bool((counts < 0).any()) or int(counts.sum()) != rows.shape[0]:
            problem = (f"counts must be non-negative integers summing to the {rows.shape[0]} rows, "
                       f"got sum {counts.sum().item()}")
        elif rows.shape[1] != self.dim:
            problem = f"rows have feature size {rows.shape[1]} but the experts were built with dim={self.dim}"
        elif _dtype_code(rows.dtype) < 0:
            problem = f"rows dtype {rows.dtype} is not supported; use one of {list(_DTYPES)}"
        if problem is None:
            header[:, 1] = rows.shape[1]
            header[:, 2] = _dtype_code(rows.dtype)
            header[:, 3:] = counts.to(device=device, dtype=torch.int64).view(world, local)
        else:
            header[:, 0] = 1
        return header, problem

    def _check_headers(self, received: Tensor, problem: Optional[str]) -> None:
        """Raise the same kind of error on every rank when any rank sent something wrong."""
        status, dims, codes = received[:, 0].tolist(), received[:, 1].tolist(), received[:, 2].tolist()
        bad = [q for q in range(self.world) if status[q]]
        if not bad:
            bad = [q for q in range(self.world) if dims[q] != self.dim]
        if bad:
            mine = f": {problem}" if problem else ""
            raise ValueError(
                f"expert-parallel exchange on rank {self.rank}: rank(s) {bad} of {self.world} sent "
                f"invalid rows (wrong shape, counts or dtype){mine}. Every rank raises, so none "
                "waits in the token exchange")
        if len(set(codes)) > 1:
            names = {q: str(_DTYPES[c]) for q, c in enumerate(codes)}
            raise ValueError(f"expert-parallel exchange on rank {self.rank}: the ranks send rows of "
                             f"different dtypes {names}; use one dtype on every rank")

    def forward(self, rows: Tensor, counts: Tensor) -> Tensor:
        """rows [M, D] grouped by expert, counts [E] -> [M, D] outputs of the owning experts."""
        group, world, local = self.group, self.world, self.num_local
        header, problem = self._header(rows, counts)
        received = header.new_empty(world, 3 + local)
        dist.all_to_all_single(received, header, group=group)
        self.stats.add_bytes(header[0].numel() * 8 * (world - 1))
        self._check_headers(received, problem)
        recv_counts = received[:, 3:]  # [W, L]: rows rank q sends to each of my experts
        send_splits = header[:, 3:].sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        if torch.is_grad_enabled() and not rows.requires_grad:
            # keep both exchanges in the graph on every rank so backward runs the same collectives
            rows = rows.detach().requires_grad_()
        recv = all_to_all_rows(rows, recv_splits, send_splits, group, self.stats)  # [R, D]
        expert_of = torch.arange(local, device=rows.device).repeat(world)
        expert_of = expert_of.repeat_interleave(recv_counts.reshape(-1).to(rows.device))  # [R]
        perm = torch.argsort(expert_of, stable=True)
        grouped = recv[perm]
        out = self.local(grouped, recv_counts.sum(0))
        if grouped.requires_grad and not out.requires_grad:
            out = out + grouped * 0  # no rows arrived: stay connected to the exchange
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        out = out[inverse]
        return all_to_all_rows(out, send_splits, recv_splits, group, self.stats)  # [M, D]


# ---------------------------------------------------------------------------------------------
# dense under expert parallelism


def _all_gather_rows(x: Tensor, group, world: int) -> tuple:
    """x [T, C] on every rank -> ([W, Tmax, C] zero-padded, [W] sizes)."""
    size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    most = max(sizes)
    padded = x.new_zeros(most, x.shape[1])
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.stack(parts), sizes


def distributed_dense_score_grad(grad_y: Tensor, x: Tensor, indices: Tensor, experts: ExpertParallelExperts,
                                 weights: ExpertWeights, scale: float, chunk_tokens: int,
                                 dtype: torch.dtype = torch.float32) -> Tensor:
    """dL/ds [T, E] (``dtype``, the scores' dtype) for the unselected experts, c <g_t, E_i(x_t)>,
    with the experts sharded.
    (With ``normalize=True`` :class:`ExpertParallelDense` passes s / sg(sum_S s) as the scores,
    so autograd divides this by sum_S s, as single-process ``dense``.)

    1. all-gather (x, g) of every rank: [W, Tmax, 2D] (zero-padded to the largest T);
    2. this rank evaluates its L experts on all of them under no_grad, ``chunk_tokens`` at a
       time: [W, Tmax, L] scores <g, E_i(x)>;
    3. all-to-all returns each rank its tokens' scores from every rank: [W, Tmax, L] ->
       [T, W L] = [T, E] (rank q's block holds experts q L .. q L + L - 1).
    Bytes sent per rank: (W - 1) Tmax (2 D b + 4 L), b the element size of x.
    """
    group, world = experts.group, experts.world
    weights = map_weights(Tensor.detach, weights)
    with torch.no_grad():
        both = torch.cat([x, grad_y.to(x.dtype)], dim=1)  # [T, 2D]
        gathered, sizes = _all_gather_rows(both, group, world)  # [W, Tmax, 2D]
        experts.stats.add_bytes(both.shape[1] * gathered.shape[1] * both.element_size() * (world - 1))
        most, dim = gathered.shape[1], x.shape[1]
        flat = gathered.reshape(world * most, 2 * dim)
        local = torch.zeros(world * most, experts.num_local, dtype=dtype, device=x.device)
        for start in range(0, flat.shape[0], chunk_tokens):
            part = flat[start:start + chunk_tokens]
            every = experts.local.every_expert(part[:, :dim], weights)  # [t, L, D]
            local[start:start + chunk_tokens] = torch.einsum("tld,td->tl", every.to(dtype),
                                                             part[:, dim:].to(dtype))
        local = local.view(world, most, experts.num_local)
        back = torch.empty_like(local)
        dist.all_to_all_single(back, local.contiguous(), group=group)  # [W src, Tmax, L]
        experts.stats.add_bytes(most * experts.num_local * local.element_size() * (world - 1))
        out = back[:, :x.shape[0]].permute(1, 0, 2).reshape(x.shape[0], experts.num_experts)
        out = out * unselected_mask(indices, experts.num_experts)
        if scale != 1.0:
            out = out * scale
    return out


class _DistributedDenseRouterGrad(torch.autograd.Function):
    """Identity on y; backward adds the dense router gradient with the experts sharded. The
    weights come in as tensors (the fields of an ExpertWeights, rebuilt in backward)."""

    @staticmethod
    def forward(y, scores, x, indices, scale, chunk_tokens, experts, *weights):
        return y.view_as(y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, scores, x, indices, scale, chunk_tokens, experts, *weights = inputs
        ctx.save_for_backward(x, indices, *weights)
        ctx.scores_dtype = scores.dtype
        ctx.scale, ctx.chunk_tokens, ctx.experts = scale, chunk_tokens, experts

    @staticmethod
    def backward(ctx, grad_y):
        x, indices, *weights = ctx.saved_tensors
        # always run the collectives: every rank takes part whatever it needs
        grad_scores = distributed_dense_score_grad(grad_y, x, indices, ctx.experts,
                                                   ExpertWeights(*weights), ctx.scale,
                                                   ctx.chunk_tokens, ctx.scores_dtype)
        if not ctx.needs_input_grad[1]:
            grad_scores = None
        return (grad_y, grad_scores) + (None,) * (5 + len(weights))


class ExpertParallelDense(Dense):
    """``dense`` with sharded experts: same forward and same router gradient as :class:`Dense`
    (with ``normalize=True`` too: c <g, E_i(x)> / sum_S s for unselected i).

    Backward costs two collectives per layer (see :func:`distributed_dense_score_grad`): an
    all-gather of every token's (x, dL/dy), 2 D values per token to each of the W - 1 other
    ranks, and an all-to-all of the L scores per token and rank; each rank evaluates its L experts
    on all W T tokens, the same expert work as single-process ``dense`` spread over the ranks.
    """

    def mix(self, y, x, routing, experts):
        if not isinstance(experts, ExpertParallelExperts):
            return super().mix(y, x, routing, experts)
        if not (torch.is_grad_enabled() and routing.scores.requires_grad):
            return y  # the same on every rank: the router is replicated
        chunk = dense_chunk_tokens(self.chunk_tokens, experts.dim, experts.hidden_dim,
                                   experts.num_local)
        return _DistributedDenseRouterGrad.apply(y, self._unselected_scores(routing), x, routing.indices,
                                                 self.config.routed_scaling_factor, chunk, experts,
                                                 *experts.stacked_weights())


# ---------------------------------------------------------------------------------------------
# conversion

#: a value printed for an option that holds a torch.Generator: only its presence is compared
#: (every rank should reseed its own generator, so the objects and states differ on purpose)
_GENERATOR_SET = "<torch.Generator>"


def _plain(value):
    """value -> a JSON-serialisable form (bool, int, float, str, None, lists, str-keyed dicts)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Generator):
        return _GENERATOR_SET
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, numbers.Integral):  # numpy integers, ...
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _unify(value):
    """A plain value with every int (not bool) below 2**53 made a float, so 1 and 1.0 agree."""
    if isinstance(value, bool) or not isinstance(value, (int, list, dict)):
        return value
    if isinstance(value, int):
        return float(value) if abs(value) < 2 ** 53 else value
    if isinstance(value, list):
        return [_unify(v) for v in value]
    return {k: _unify(v) for k, v in value.items()}


def _canonical(value) -> str:
    """The comparison key of a plain value: exact (floats by repr, NaN equal to NaN), with 1 and
    1.0 equal and bools kept apart."""
    return json.dumps(_unify(value))


def _settings(moe) -> dict:
    """Everything that must agree across the ranks of an expert-parallel MoE, by field name.

    A difference in any of these changes the collectives (top_k, capacity_factor and the losses
    and their order change what is exchanged and all-reduced; ``dense`` adds backward
    collectives) or the maths every rank is meant to share: the router configuration (every
    :class:`moegrad.routing.RouterConfig` field), the expert shape and activation, the estimator
    name and option values (for a ``generator`` only whether one is set), the balance losses
    ``[[name, coefficient], ...]`` in call order, the capacity factor, whether a
    :class:`moegrad.balancing.BalanceWindow` is attached and the parameter dtypes.
    """
    config = moe.router.config
    out = {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    out["hidden_dim"] = moe.experts.hidden_dim
    out["activation"] = _plain(moe.experts.activation)
    estimator = moe.router.estimator
    out["estimator"] = _plain(getattr(estimator, "name", type(estimator).__name__))
    for key in getattr(estimator, "options", {}):
        out[f"estimator option {key}"] = _plain(getattr(estimator, key, None))
    losses = moe.losses
    out["losses"] = (_plain([[name, coef] for name, coef in losses.items()])
                     if isinstance(losses, dict) else _plain(losses))
    out["capacity_factor"] = _plain(moe.capacity_factor)
    out["balance_window"] = moe.balance_window is not None
    dtypes = []
    for p in moe.parameters():
        if str(p.dtype) not in dtypes:
            dtypes.append(str(p.dtype))
    out["parameter dtypes"] = dtypes
    return out


def _digest(settings: dict) -> int:
    """A 52-bit hash of the settings (exact in an int64 and in a float64)."""
    text = _canonical(settings)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 12


def _raise_settings_mismatch(settings: dict, group, device, where: str) -> None:
    """Collective (every rank calls it once the digests disagree): all-gather every rank's
    settings (JSON bytes, [W, longest] int32 summed like the entry flags) and raise a ValueError
    naming each differing field and each rank's value."""
    world, rank = group_size(group), group_rank(group)
    data = torch.tensor(list(json.dumps(settings).encode()), dtype=torch.int32, device=device)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank] = data.numel()
    dist.all_reduce(sizes, group=group)
    gathered = torch.zeros(world, int(sizes.max()), dtype=torch.int32, device=device)
    gathered[rank, :data.numel()] = data
    dist.all_reduce(gathered, group=group)
    every = [json.loads(bytes(gathered[q, :int(sizes[q])].tolist()).decode()) for q in range(world)]
    names = list(dict.fromkeys(k for s in every for k in s))
    missing = object()
    differ = []
    for name in names:
        if name.startswith("estimator option ") and len({_canonical(s.get("estimator")) for s in every}) > 1:
            continue  # options of different estimators: the estimator line says it all
        values = [s.get(name, missing) for s in every]
        keys = [None if v is missing else _canonical(v) for v in values]
        if len(set(keys)) == 1:
            continue
        by_value = {}
        for q, (key, value) in enumerate(zip(keys, values)):
            by_value.setdefault(key, [value, []])[1].append(q)
        shown = ", ".join(f"{'(absent)' if value is missing else repr(value)} on rank(s) {ranks}"
                          for value, ranks in by_value.values())
        differ.append(f"{name}: {shown}")
    if not differ:  # the digests differ, the values compare equal: show them all
        differ = [f"settings: {s!r} on rank(s) [{q}]" for q, s in enumerate(every)]
    raise ValueError(
        f"{where}: the ranks disagree on the MoE's settings (this is rank {rank} of {world}): "
        + "; ".join(differ) + ". Expert parallelism needs the same settings on every rank (the "
        "estimator and its options, the balance losses in the same order, top_k, score, normalize, "
        "capacity_factor, ...): otherwise the collectives stop matching and every rank waits until "
        "the process-group timeout")


def _raise_if_any_rank(flagged: list, problem: Optional[Exception], note: str) -> None:
    """After an all-reduce of per-rank problem flags: if any rank flagged one, every rank raises
    (so none waits in the next collective): its own ``problem`` with ``note`` appended, or a
    ValueError pointing at the first flagged rank. ``note`` may use {bad} and {world}."""
    bad = [q for q, flag in enumerate(flagged) if flag]
    if not bad:
        return
    note = note.format(bad=bad, world=len(flagged))
    if problem is not None:
        raise type(problem)(f"{problem} ({note})") from problem
    raise ValueError(f"{note} (see the error on rank {bad[0]})")


def _check_inputs_across_ranks(moe, args, kwargs):
    """Forward pre-hook: validate x (and mask) on every rank together, so that bad input on one
    rank raises on all of them instead of leaving the others waiting in the exchange.

    Flags exchanged per rank (one [W, 6] int64 all-reduce): problem, dtype code, training mode,
    grad mode (``torch.is_grad_enabled()``), whether the router scores will require grad, and a
    52-bit digest of the layer's settings (:func:`_settings`: estimator and options, losses,
    top_k, capacity_factor, ...; they may have been changed since :func:`expert_parallel`, e.g.
    ``moe.losses = ...`` on one rank). Grad mode decides whether the exchanges enter the autograd
    graph (and ``dense`` adds backward collectives when the scores require grad): a mismatch
    would leave one side waiting in backward until the process-group timeout, so every rank
    raises instead. Differing digests cost one more (collective) gather of every rank's settings,
    to name the fields that differ."""
    # the ranks of the layer's group (the ep group, or every rank under moegrad.fsdp)
    group = moe.process_group
    world, rank = group_size(group), group_rank(group)
    x = args[0] if args else kwargs.get("x")
    mask = args[1] if len(args) > 1 else kwargs.get("mask")
    problem = None
    try:
        flatten_tokens(x, moe.dim)
        flatten_mask(mask, tuple(x.shape[:-1]))
        if moe.router.config.check_finite and x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError("x holds NaN/Inf: fix the input, or build the MoE with "
                             "check_finite=False to skip this check")
    except (TypeError, ValueError) as err:
        problem = err
    grad = torch.is_grad_enabled()
    # the scores are softmax/sigmoid of x W_g^T: they require grad iff x or the gate does
    scores_grad = grad and (moe.router.gate.weight.requires_grad
                            or (isinstance(x, Tensor) and x.requires_grad))
    settings = _settings(moe)
    device = moe.router.gate.weight.device
    flags = torch.zeros(world, 6, dtype=torch.int64, device=device)
    flags[rank, 0] = problem is not None
    flags[rank, 1] = _dtype_code(x.dtype) if problem is None else -1
    flags[rank, 2] = int(moe.training)
    flags[rank, 3] = int(grad)
    flags[rank, 4] = int(scores_grad)
    flags[rank, 5] = _digest(settings)
    dist.all_reduce(flags, group=group)
    if len(set(flags[:, 5].tolist())) > 1:
        _raise_settings_mismatch(settings, group, device, "expert-parallel MoE")
    _raise_if_any_rank(flags[:, 0].tolist(), problem, "expert-parallel MoE: rank(s) {bad} of "
                       "{world} got invalid input; every rank raises so none waits in the token "
                       "exchange")
    if len(set(flags[:, 1].tolist())) > 1:
        raise ValueError(f"expert-parallel MoE: the ranks call the layer with different dtypes "
                         f"{[str(_DTYPES[c]) for c in flags[:, 1].tolist()]}; use one dtype everywhere")
    if len(set(flags[:, 2].tolist())) > 1:
        raise ValueError("expert-parallel MoE: some ranks are in training mode and others in eval "
                         "mode; call model.train() / model.eval() on every rank")
    if len(set(flags[:, 3].tolist())) > 1:
        off = [q for q in range(world) if not flags[q, 3]]
        on = [q for q in range(world) if flags[q, 3]]
        raise ValueError(
            f"expert-parallel MoE: rank(s) {off} of {world} run under torch.no_grad() / "
            f"inference_mode and rank(s) {on} with grad enabled (this is rank {rank}); only one side "
            "would run the backward exchanges and the other would wait until the process-group "
            "timeout. Use the same grad mode on every rank")
    if len(set(flags[:, 4].tolist())) > 1:
        off = [q for q in range(world) if not flags[q, 4]]
        raise ValueError(
            f"expert-parallel MoE: the router scores require grad on some ranks but not on rank(s) "
            f"{off} of {world} (this is rank {rank}): neither x nor router.gate.weight requires grad "
            "there. The router is replicated: freeze it (requires_grad_(False)) on every rank or none")


def _check_identical(moe, group, problem: Optional[Exception] = None) -> None:
    """Compare the MoE across ranks before converting it (collective).

    One [W, 4] float64 all-reduce (each rank fills its row): the digest of :func:`_settings`,
    whether this rank found ``problem`` (an unsupported estimator, E not divisible by W), and
    the sum and absolute sum of the parameters. Every rank then raises the same kind of error:
    differing settings are named field by field (:func:`_raise_settings_mismatch`), a problem on
    any rank raises everywhere, differing parameters last."""
    world, rank = group_size(group), group_rank(group)
    settings = _settings(moe)
    device = moe.router.gate.weight.device
    params = [p.detach().double() for p in moe.parameters()]
    rows = torch.zeros(world, 4, dtype=torch.float64, device=device)
    rows[rank] = torch.tensor([_digest(settings), problem is not None,
                               sum(float(p.sum()) for p in params),
                               sum(float(p.abs().sum()) for p in params)], dtype=torch.float64)
    dist.all_reduce(rows, group=group)
    if len(set(rows[:, 0].tolist())) > 1:
        _raise_settings_mismatch(settings, group, device, "expert_parallel")
    _raise_if_any_rank(rows[:, 1].tolist(), problem, "expert_parallel: refused on rank(s) {bad} "
                       "of {world}; every rank raises so none waits in a collective")
    if not torch.allclose(rows[:, 2:], rows[:1, 2:].expand(world, 2), rtol=1e-9, atol=0.0):
        raise ValueError("expert_parallel: the MoE differs across ranks in its initial parameters; "
                         "build it identically on every rank (same torch.manual_seed before "
                         "construction) or broadcast rank 0's parameters first")


def expert_parallel(moe, group=None):
    """Convert ``moe`` (a :class:`moegrad.MoE` built identically on every rank) in place to
    expert parallelism over ``group`` (default: the whole world); returns it.

    Rank r keeps experts [r E/W, (r+1) E/W) (``moe.experts`` becomes an
    :class:`ExpertParallelExperts`), the router stays replicated, the ``dense`` estimator becomes
    :class:`ExpertParallelDense`, ``default_moe`` statistics and the balance losses use global
    counts, and a forward pre-hook checks the inputs of all ranks together.
    Call it on every rank of the group, in the same order for every layer.

    The ranks must agree on the settings (:func:`_settings`: estimator name and options, balance
    losses and their order, top_k, score, normalize, capacity_factor, temperature, ...) and the
    initial parameters; otherwise every rank raises a ValueError naming what differs, here and
    at every forward (settings changed later, e.g. ``moe.losses`` on one rank), instead of
    waiting in mismatched collectives until the process-group timeout.
    """
    if not isinstance(moe, MoE):
        raise TypeError(f"expert_parallel expects a moegrad.MoE, got {type(moe).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert_parallel needs torch.distributed: call "
                           "torch.distributed.init_process_group (gloo on CPU, nccl on GPU) first, "
                           "e.g. by launching with torchrun")
    if isinstance(moe.experts, ExpertParallelExperts):
        raise ValueError("this MoE is already expert-parallel")
    if not isinstance(moe.experts, Experts):
        raise TypeError(f"moe.experts must be a moegrad.Experts, got {type(moe.experts).__name__}")
    estimator = moe.router.estimator
    name = estimator.name
    if group is None:
        group = dist.group.WORLD  # an explicit group: layer and losses test ``group is not None``
    world = group_size(group)
    # these depend on settings that may differ per rank: raise them on every rank together
    problem = None
    if moe.router.config.routing == "expert_choice":
        problem = ValueError("routing='expert_choice' is not supported under expert parallelism "
                             "yet (the experts would choose among each rank's tokens only)")
    elif moe.router.config.routing == "remoe":
        problem = ValueError("routing='remoe' is not supported under expert parallelism yet (its "
                             "adaptive L1 coefficient would be steered by each rank's tokens only)")
    elif name not in LOCAL_ESTIMATORS + CONVERTED_ESTIMATORS:
        problem = ValueError(
            f"estimator {name!r} is not known to work under expert parallelism (its mix step may "
            f"need every expert on every rank); use one of {sorted(LOCAL_ESTIMATORS + CONVERTED_ESTIMATORS)}")
    elif moe.num_experts % world:
        problem = ValueError(
            f"num_experts={moe.num_experts} is not divisible by {world}, the size of the "
            "expert-parallel process group: expert parallelism gives each of its ranks "
            "num_experts / size experts; use a multiple of the group's size (or a smaller group)")
    _check_identical(moe, group, problem)
    moe.experts = ExpertParallelExperts(moe.experts, group)
    if name == "dense" and type(estimator) is Dense:
        converted = ExpertParallelDense(estimator.config, **{k: getattr(estimator, k) for k in Dense.options})
        converted.train(estimator.training)
        moe.router.estimator = converted
    moe.process_group = group
    moe.router.process_group = group  # BiasBalancer all-reduces the loads of such routers
    moe._ep_hook = moe.register_forward_pre_hook(_check_inputs_across_ranks, with_kwargs=True)
    return moe


# ---------------------------------------------------------------------------------------------
# training helpers


def expert_parallel_modules(module: nn.Module) -> list:
    """(name, ExpertParallelExperts) pairs inside ``module``."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, ExpertParallelExperts)]


def expert_parameter_names(module: nn.Module) -> list:
    """Names (as in ``module.named_parameters()``) of the sharded expert parameters."""
    ids = {id(p) for _, m in expert_parallel_modules(module) for p in m.parameters()}
    return [n for n, p in module.named_parameters() if id(p) in ids]


def ddp_ignore_experts(model: nn.Module) -> list:
    """Tell DistributedDataParallel (call before wrapping) to leave the sharded expert parameters
    alone: they differ per rank and get their gradient from the exchange. Returns their names."""
    names = expert_parameter_names(model)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


@torch.no_grad()
def average_expert_grads(module: nn.Module) -> None:
    """Divide the expert gradients by W (after backward, before the optimizer step).

    The exchange sums every rank's contribution into the expert gradients, while DDP averages the
    replicated ones; this makes both the gradient of the mean over ranks of the per-rank losses.
    """
    for _, m in expert_parallel_modules(module):
        for p in m.parameters():
            if p.grad is not None:
                p.grad.div_(m.world)


def full_state_dict(module: nn.Module) -> dict:
    """The state dict of ``module`` in the single-process layout (collective: call on every rank).

    Each ``<prefix>local.w1`` [L, H, D] slice is all-gathered into ``<prefix>w1`` [E, H, D] (same
    for w3, w2), so a plain model built without :func:`expert_parallel` loads it; typically
    rank 0 saves it with ``torch.save``.
    """
    state = module.state_dict()
    out = {}
    ep = dict(expert_parallel_modules(module))
    for key, value in state.items():
        owner = next((p for p in ep if key.startswith(f"{p}.local." if p else "local.")), None)
        if owner is None:
            out[key] = value
            continue
        m, head = ep[owner], (f"{owner}." if owner else "")
        parts = [torch.empty_like(value) for _ in range(m.world)]
        dist.all_gather(parts, value.contiguous(), group=m.group)
        out[head + key[len(head) + len("local."):]] = torch.cat(parts)
    return out


def load_full_state_dict(module: nn.Module, state: dict, strict: bool = True):
    """Load a single-process state dict (experts [E, ...]) into an expert-parallel ``module``:
    each rank keeps its slice. Returns ``module.load_state_dict``'s result."""
    state = dict(state)
    for prefix, m in expert_parallel_modules(module):
        head = f"{prefix}." if prefix else ""
        for name in ("w1", "w3", "w2"):
            key = f"{head}{name}"
            if key not in state:
                continue
            full = state.pop(key)
            if full.shape[0] != m.num_experts:
                raise ValueError(f"{key} has {full.shape[0]} experts, the model has {m.num_experts}")
            state[f"{head}local.{name}"] = full[m.first:m.first + m.num_local]
    return module.load_state_dict(state, strict=strict)


#: moved to moegrad._testing (test helpers); still importable from here with a DeprecationWarning
__getattr__ = moved_names(__name__, {"init_process_group_for_tests": "moegrad._testing",
                                     "free_port": "moegrad._testing"})

__all__ = ["expert_parallel", "ExpertParallelExperts", "ExpertParallelDense", "all_to_all_rows",
           "all_reduce_share", "all_reduce_detached", "reduce_observation", "ExchangeStats",
           "distributed_dense_score_grad", "expert_parameter_names", "ddp_ignore_experts",
           "average_expert_grads", "full_state_dict", "load_full_state_dict", "group_size",
           "group_rank", "LOCAL_ESTIMATORS", "CONVERTED_ESTIMATORS"]
