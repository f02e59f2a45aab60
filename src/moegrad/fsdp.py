"""FSDP2 with expert parallelism: the 2-D (dp x ep) layout of large MoE training.

Shapes and names: a 2-D :class:`~torch.distributed.device_mesh.DeviceMesh` with dimensions
``dp`` (size P) and ``ep`` (size Q), N = P Q ranks, rank (d, e) at ``mesh.mesh[d, e]``; E experts
per MoE layer, L = E / Q on each ep rank, [L, H, D] its slice of ``w1``.

:func:`expert_parallel_fsdp` (as torchtitan's ``apply_fsdp`` with EP, where the routed experts
are sharded over the data-parallel dims left over by EP and everything else over all of them):

* every :class:`moegrad.MoE` becomes expert-parallel over the ``ep`` group
  (:func:`moegrad.distributed.expert_parallel`): ep rank e holds experts [e L, (e + 1) L), the
  same slice on the P ranks (0, e) .. (P - 1, e) of its ``dp`` column;
* each layer's experts (the :class:`~moegrad.distributed.ExpertParallelExperts` module) are
  ``fully_shard``-ed over ``mesh["dp"]``: those P replicas of the slice become P shards (dim 0);
* the layer's own collectives (balance-loss counts, ``default_moe`` statistics, the input and
  settings checks, BiasBalancer/QuantileBalancer loads) use the group of all N ranks
  (``moe.process_group``, ``moe.router.process_group``): the router is replicated over dp and ep,
  so its state must see every rank's tokens; only the token exchange stays on ``ep``;
* the rest (routers, norms, projections: replicated over dp *and* ep) are ``fully_shard``-ed
  over the flattened dp x ep mesh of all N ranks: the optional ``blocks`` one by one (modules
  returning tensors or tuples of them, e.g. transformer blocks), then the root ``model``.

Gradients. Rank r computes the mean loss L_r of its own tokens (each rank the same number), so
the single-process loss of the concatenated global batch is L = (1/N) sum_r L_r. FSDP averages
the replicated parameters' gradients over its N ranks: (1/N) sum_r dL_r/dtheta, exact. An expert
slice on rank (d, e) already holds, after the token exchange's backward, the sum over the Q ranks
of row d of their dL_r/dtheta; FSDP's reduce-scatter over ``dp`` adds the P rows, giving
sum_r dL_r/dtheta over all N ranks, so the experts' divide factor is set to N (not FSDP's
default P; ``set_gradient_divide_factor(N)``, as torchtitan does). Balance losses: each rank's
``aux_loss`` is its share over the N ranks, with mean over ranks the global batch's loss (see
:mod:`moegrad.distributed`; with the balance counts over ep alone it would be the mean over dp
rows of each row's loss, a different, non-linear objective), so ``loss + aux_loss`` on every
rank needs no further factor. Do not call :func:`moegrad.distributed.average_expert_grads`
here (that is for DDP). On gloo, which has no PREMUL_SUM, the experts' reduce-scatter is a
plain sum followed by the division (``set_force_sum_reduction_for_comms``).

Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`, with ``torch.distributed.checkpoint``).
FSDP leaves an expert parameter as a DTensor of global shape [L, H, D] on ``mesh["dp"]``:
the Q ep columns would save Q different tensors under one name, and DCP (which takes equal
names with equal offsets for replicas) would keep one. :func:`checkpoint_state` therefore
relabels each expert tensor (parameter and optimizer state) as the DTensor of the *whole*
[E, H, D] tensor under the single-process name (``moes.0.experts.w1``, as
:func:`moegrad.distributed.full_state_dict` names it), placed ``(Shard(0), Shard(0))`` on the
(ep, dp) view of the mesh (built from its existing groups): rank (d, e) holds rows
e L + chunk d of L, exactly its FSDP shard, no copy. Each expert is stored once, and the files
are a plain DCP checkpoint: ``dcp_to_torch_save`` (one process) gives ``{"model": ...}`` that a
plain, unsharded model loads strictly. Loading needs the same mesh shape (other shapes would
need DCP's resharding, untested here). Everything else is ``get_model_state_dict`` /
``get_optimizer_state_dict`` of ``torch.distributed.checkpoint.state_dict`` unchanged. The
recipe, with a model sharded by :func:`expert_parallel_fsdp` (every rank)::

    save_checkpoint(model, optimizer, path)       # dcp.save(checkpoint_state(model, optimizer))
    model2 = expert_parallel_fsdp(build(), mesh); optimizer2 = AdamW(model2.parameters())
    load_checkpoint(model2, optimizer2, path)     # dcp.load, then set_model/optimizer_state_dict

Limits: the ``dense`` estimator is refused (its backward uses every local expert's weights
outside the experts' forward, where FSDP holds only shards); ``mesh`` must cover all ranks.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from moegrad.distributed import ExpertParallelExperts, expert_parallel, expert_parallel_modules
from moegrad.layer import MoE

#: estimators refused by :func:`expert_parallel_fsdp` (they read expert weights outside forward)
UNSUPPORTED_ESTIMATORS = ("dense",)


@dataclasses.dataclass
class FSDPLayout:
    """The meshes :func:`expert_parallel_fsdp` used: ``mesh`` (dp, ep), ``flat`` (all N ranks),
    ``expert_mesh`` (the (ep, dp) view on which experts are checkpointed), the dim names."""

    mesh: object
    flat: object
    expert_mesh: object
    dp_dim: str
    ep_dim: str


def _check_mesh(mesh, dp_dim: str, ep_dim: str):
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
    if not isinstance(dp_dim, str) or not isinstance(ep_dim, str) or dp_dim == ep_dim:
        raise ValueError(f"dp_dim and ep_dim must be two different mesh dimension names, got "
                         f"dp_dim={dp_dim!r}, ep_dim={ep_dim!r}")
    names = tuple(mesh.mesh_dim_names or ())
    if mesh.ndim != 2 or set(names) != {dp_dim, ep_dim}:
        raise ValueError(
            f"mesh must be 2-D with dimensions named {dp_dim!r} and {ep_dim!r}, got a {mesh.ndim}-D "
            f"mesh with mesh_dim_names={names or None}; build it with init_device_mesh(device, "
            f"(dp, ep), mesh_dim_names=({dp_dim!r}, {ep_dim!r}))")
    world = dist.get_world_size()
    if mesh.size() != world:
        raise ValueError(f"mesh has {mesh.size()} ranks ({dict(zip(names, mesh.shape))}) but the "
                         f"world has {world}: the mesh must cover every rank")


def _check_identical_over(model: nn.Module, group, rank: int, world: int) -> None:
    """Raise on every rank unless all ranks built ``model`` with the same parameters (collective:
    one [N, 2] float64 all-reduce of each rank's parameter sum and absolute sum). FSDP keeps each
    rank's own slice of a replicated parameter, so differing copies would mix silently."""
    params = [p.detach().double() for p in model.parameters()]
    device = params[0].device if params else torch.device("cpu")
    rows = torch.zeros(world, 2, dtype=torch.float64, device=device)
    rows[rank, 0] = sum(float(p.sum()) for p in params)
    rows[rank, 1] = sum(float(p.abs().sum()) for p in params)
    dist.all_reduce(rows, group=group)
    if not torch.allclose(rows, rows[:1].expand(world, 2), rtol=1e-9, atol=0.0):
        raise ValueError("expert_parallel_fsdp: the model differs across the mesh's ranks in its initial "
                         "parameters; build it identically on every rank (same torch.manual_seed before "
                         "construction) or broadcast rank 0's parameters first")


def expert_parallel_fsdp(model: nn.Module, mesh, *, dp_dim: str = "dp", ep_dim: str = "ep",
                         blocks: Iterable[nn.Module] = (), reshard_after_forward: bool = True,
                         mp_policy=None) -> nn.Module:
    """Shard ``model`` in place over ``mesh`` (dp x ep, see the module docstring); returns it.

    Every :class:`moegrad.MoE` inside ``model`` (built identically on every rank) becomes
    expert-parallel over ``mesh[ep_dim]``; its experts are ``fully_shard``-ed over
    ``mesh[dp_dim]`` with gradient divide factor N = mesh.size(); each of ``blocks`` and then
    ``model`` over all N ranks. Collective: call on every rank. Every rank must have built
    ``model`` identically (checked: ValueError on every rank otherwise). ``mp_policy`` (a
    ``MixedPrecisionPolicy``) is passed to every ``fully_shard``. Attaches the layout as
    ``model.moegrad_fsdp_layout`` (:class:`FSDPLayout`) for the checkpoint helpers.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(blocks, nn.Module) and not hasattr(type(blocks), "__iter__"):
        raise TypeError(f"blocks must be an iterable of submodules of model (e.g. a list or "
                        f"model.layers), got one {type(blocks).__name__}: pass [block]")
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(f"mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy or None, got "
                        f"{type(mp_policy).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert_parallel_fsdp needs torch.distributed: call init_process_group first "
                           "(e.g. launch with torchrun)")
    _check_mesh(mesh, dp_dim, ep_dim)
    moes = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
    if not moes:
        raise ValueError("model holds no moegrad.MoE: expert_parallel_fsdp shards MoE layers' experts "
                         "over ep; use torch.distributed.fsdp.fully_shard directly for other models")
    for name, moe in moes:
        where = name or "model"
        if isinstance(moe.experts, ExpertParallelExperts):
            raise ValueError(f"{where} is already expert-parallel; pass a model built without "
                             "moegrad.distributed.expert_parallel")
        if moe.router.estimator.name in UNSUPPORTED_ESTIMATORS:
            raise ValueError(f"{where} uses estimator {moe.router.estimator.name!r}, not supported with "
                             f"FSDP (it reads the expert weights outside the experts' forward); use one "
                             f"of the others, e.g. 'topk' or 'default_moe'")
    blocks = list(blocks)
    for block in blocks:
        if not isinstance(block, nn.Module) or not any(block is m for m in model.modules()):
            raise ValueError(f"blocks must be submodules of model, got {type(block).__name__}")
        if isinstance(block, MoE):
            raise ValueError("blocks must not be a moegrad.MoE itself (its MoEOutput is not a "
                             "pytree, so FSDP could not re-gather its router for backward); pass the "
                             "block that calls it")
    dp_mesh, ep_mesh = mesh[dp_dim], mesh[ep_dim]
    ep_group, dp_group = ep_mesh.get_group(), dp_mesh.get_group()
    flat = mesh._flatten(f"{dp_dim}_{ep_dim}")  # all N ranks (cached by the mesh on a second call)
    names = tuple(mesh.mesh_dim_names)
    order = (names.index(ep_dim), names.index(dp_dim))
    expert_mesh = DeviceMesh.from_group([ep_group, dp_group], mesh.device_type,
                                        mesh=mesh.mesh.permute(*order), mesh_dim_names=(ep_dim, dp_dim))
    _check_identical_over(model, flat.get_group(), flat.get_local_rank(), mesh.size())
    options = dict(reshard_after_forward=reshard_after_forward)
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    gloo = dist.get_backend(dp_group) == "gloo"
    flat_group = flat.get_group()
    for _, moe in moes:
        expert_parallel(moe, ep_group)
        # router, balance losses, default_moe statistics: replicated over all N ranks
        moe.process_group = moe.router.process_group = flat_group
        fully_shard(moe.experts, mesh=dp_mesh, **options)
        moe.experts.set_gradient_divide_factor(float(mesh.size()))
        if gloo:  # gloo has no PREMUL_SUM: sum, then divide
            moe.experts.set_force_sum_reduction_for_comms(True)
    for block in blocks:
        fully_shard(block, mesh=flat, **options)
    fully_shard(model, mesh=flat, **options)
    model.moegrad_fsdp_layout = FSDPLayout(mesh, flat, expert_mesh, dp_dim, ep_dim)
    return model


_NO_PATH = object()


def _layout(model, optimizer=None, where: str = "", path=_NO_PATH) -> FSDPLayout:
    """The model's :class:`FSDPLayout`, after checking the arguments of the checkpoint helper
    ``where`` (``optimizer``: None or an Optimizer; ``path``, for the helpers that take one:
    a str or os.PathLike)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module sharded by expert_parallel_fsdp, got "
                        f"{type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{where}: optimizer must be a torch.optim.Optimizer or None, got "
                        f"{type(optimizer).__name__} (the order is (model, optimizer, path))")
    if path is not _NO_PATH and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: path must be a str or os.PathLike (a checkpoint directory), got "
                        f"{type(path).__name__} (the order is (model, optimizer, path))")
    layout = getattr(model, "moegrad_fsdp_layout", None)
    if not isinstance(layout, FSDPLayout):
        raise ValueError(f"{where}: model was not sharded by moegrad.fsdp.expert_parallel_fsdp (no "
                         "moegrad_fsdp_layout attribute)")
    return layout


def _expert_names(model) -> dict:
    """{``<prefix>.local.w1``: (``<prefix>.w1``, its ExpertParallelExperts)} for every expert parameter."""
    out = {}
    for prefix, m in expert_parallel_modules(model):
        head = f"{prefix}." if prefix else ""
        for name, _ in m.local.named_parameters():
            out[f"{head}local.{name}"] = (f"{head}{name}", m)
    return out


def _contiguous_stride(shape) -> tuple:
    return torch.empty(0).new_empty(shape, device="meta").stride()


def _to_global(value, m: ExpertParallelExperts, expert_mesh):
    """DTensor [L, ...] Shard(0) on mesh["dp"] -> the same local rows as DTensor [E, ...],
    (Shard(0), Shard(0)) on the (ep, dp) mesh (no copy)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(value, DTensor):
        return value  # e.g. Adam's scalar step
    shape = (m.num_experts,) + tuple(value.shape[1:])
    return DTensor.from_local(value.to_local(), expert_mesh, [Shard(0), Shard(0)], run_check=False,
                              shape=torch.Size(shape), stride=_contiguous_stride(shape))


def _to_local_layout(value, template):
    """Inverse of :func:`_to_global`: the loaded rows as a DTensor with ``template``'s (the
    parameter's) mesh and placements."""
    from torch.distributed.tensor import DTensor

    if not isinstance(template, DTensor) or not isinstance(value, DTensor):
        return value  # not an expert tensor (e.g. Adam's scalar step)
    return DTensor.from_local(value.to_local(), template.device_mesh, template.placements, run_check=False,
                              shape=template.shape, stride=template.stride())


def checkpoint_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """``{"model": ..., "optimizer": ...}`` for ``dcp.save``/``dcp.load``: the sharded state dicts
    of ``torch.distributed.checkpoint.state_dict``, each expert tensor relabelled as its share of
    the global [E, ...] tensor under the single-process name (module docstring). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    layout, names = _layout(model, optimizer, where="checkpoint_state"), _expert_names(model)
    model_state = {}
    for key, value in get_model_state_dict(model).items():
        if key in names:
            key, value = names[key][0], _to_global(value, names[key][1], layout.expert_mesh)
        model_state[key] = value
    state = {"model": model_state}
    if optimizer is not None:
        optim_state = get_optimizer_state_dict(model, optimizer)
        per_param = {}
        for key, entry in optim_state["state"].items():
            if key in names:
                global_name, m = names[key]
                key, entry = global_name, {k: _to_global(v, m, layout.expert_mesh) for k, v in entry.items()}
            per_param[key] = entry
        state["optimizer"] = {"state": per_param, "param_groups": optim_state["param_groups"]}
    return state


def save_checkpoint(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], path) -> None:
    """``dcp.save(checkpoint_state(model, optimizer), checkpoint_id=path)`` (every rank)."""
    import torch.distributed.checkpoint as dcp

    _layout(model, optimizer, "save_checkpoint", path)
    dcp.save(checkpoint_state(model, optimizer), checkpoint_id=path)


def load_checkpoint(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], path) -> None:
    """Load a :func:`save_checkpoint` directory into ``model`` (and ``optimizer``), both built and
    sharded like the saved ones (same mesh shape; collective). A fresh optimizer gets its state
    initialised by ``get_optimizer_state_dict``, then overwritten."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    _layout(model, optimizer, "load_checkpoint", path)
    state = checkpoint_state(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    names = _expert_names(model)
    back = {global_name: local for local, (global_name, _) in names.items()}
    current = dict(model.state_dict())
    model_state = {}
    for key, value in state["model"].items():
        if key in back:
            key = back[key]
            value = _to_local_layout(value, current[key])
        model_state[key] = value
    set_model_state_dict(model, model_state)
    if optimizer is not None:
        per_param = {}
        for key, entry in state["optimizer"]["state"].items():
            if key in back:
                key = back[key]
                entry = {k: _to_local_layout(v, current[key]) for k, v in entry.items()}
            per_param[key] = entry
        set_optimizer_state_dict(model, optimizer, {"state": per_param,
                                                    "param_groups": state["optimizer"]["param_groups"]})


def full_expert_tensor(value, model: nn.Module, name: str):
    """The whole [E, ...] tensor of expert parameter (or gradient) ``value`` of parameter ``name``
    (``<prefix>.local.w1``), gathered over every rank (collective; for tests and inspection)."""
    layout = _layout(model, where="full_expert_tensor")
    names = _expert_names(model)
    if name not in names:
        raise ValueError(f"{name!r} is not an expert parameter of model; expert parameters: {sorted(names)}")
    return _to_global(value, names[name][1], layout.expert_mesh).full_tensor()


__all__ = ["expert_parallel_fsdp", "FSDPLayout", "checkpoint_state", "save_checkpoint", "load_checkpoint",
           "full_expert_tensor", "UNSUPPORTED_ESTIMATORS"]
