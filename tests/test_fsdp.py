"""FSDP2 with expert parallelism (moegrad.fsdp) on a 2 x 2 (dp x ep) gloo mesh of 4 processes.

One spawned group runs every check once (module-scoped fixture); each rank writes what it
measured to a JSON file and the tests assert on it. Reference: the same model (same seed) in
one process, on the 4 ranks' batches concatenated, loss = mean squared error + aux loss. The
sharded run's loss (mean over ranks) and gathered gradients must equal it, also after two SGD
steps with momentum. A DCP checkpoint after two AdamW steps, loaded into a freshly built
sharded model (different initial weights) and optimizer, must give the same next two losses as
continuing without the round-trip, and converted to one file in one process
(``dcp_to_torch_save``) it loads into the plain model and gives the ranks' outputs.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moegrad

D, H, E, K, B, S = 8, 12, 4, 2, 2, 5
WORLD = 4
TOL = 1e-5


class Block(nn.Module):
    """h [B, S, D] -> (h + MoE(norm(h)), aux): returns a tuple of tensors, so FSDP can wrap it."""

    def __init__(self, estimator: str, experts: int):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.moe = moegrad.MoE(D, H, experts, K, estimator=estimator, losses={"switch": 0.1, "z_loss": 0.01})

    def forward(self, h):
        out = self.moe(self.norm(h))
        return h + out.y, out.aux_loss


class Tiny(nn.Module):
    """x [B, S, D] -> (h [B, S, D], aux): a projection, then two residual Blocks norm -> MoE."""

    def __init__(self, seed: int, estimator: str = "topk", experts: int = E):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(D, D)
        self.blocks = nn.ModuleList(Block(estimator, experts) for _ in range(2))

    def forward(self, x):
        h = self.proj(x)
        aux = h.new_zeros(())
        for block in self.blocks:
            h, block_aux = block(h)
            aux = aux + block_aux
        return h, aux


def _batch(rank: int, step: int):
    gen = torch.Generator().manual_seed(1000 + 100 * step + rank)
    return torch.randn(B, S, D, generator=gen), torch.randn(B, S, D, generator=gen)


def _global_batch(step: int):
    parts = [_batch(r, step) for r in range(WORLD)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _loss(model, x, target):
    y, aux = model(x)
    return F.mse_loss(y, target) + aux


def _max_diffs(model, ref, grads: bool) -> float:
    """Largest |sharded - reference| over every parameter (or gradient), gathered (collective)."""
    from moegrad.fsdp import _expert_names, full_expert_tensor

    experts = _expert_names(model)
    refs = dict(ref.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        value = p.grad if grads else p.detach()
        if name in experts:
            full, want = full_expert_tensor(value, model, name), refs[experts[name][0]]
        else:
            full, want = value.full_tensor(), refs[name]
        want = want.grad if grads else want.detach()
        assert full.shape == want.shape, (name, full.shape, want.shape)
        worst = max(worst, float((full - want).abs().max()))
    return worst


def _mean_over_ranks(value):
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value)
    return float(value) / WORLD


def _bad_input(mesh):
    """Messages of the ValueErrors raised before any collective."""
    from torch.distributed.device_mesh import init_device_mesh

    from moegrad.fsdp import expert_parallel_fsdp

    out = {}
    flat = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
    for key, call in {"names": lambda: expert_parallel_fsdp(Tiny(0), mesh, dp_dim="data"),
                      "one_d": lambda: expert_parallel_fsdp(Tiny(0), flat),
                      "same_dims": lambda: expert_parallel_fsdp(Tiny(0), mesh, ep_dim="dp"),
                      "no_moe": lambda: expert_parallel_fsdp(nn.Linear(2, 2), mesh),
                      "dense": lambda: expert_parallel_fsdp(Tiny(0, "dense"), mesh),
                      "blocks": lambda: expert_parallel_fsdp(Tiny(0), mesh, blocks=[nn.Linear(2, 2)]),
                      # collective (every rank raises): 3 experts over ep = 2; different weights per rank
                      "differ": lambda: expert_parallel_fsdp(Tiny(int(flat.get_local_rank())), mesh),
                      "odd_experts": lambda: expert_parallel_fsdp(Tiny(0, experts=3), mesh)}.items():
        try:
            call()
            out[key] = None
        except ValueError as err:
            out[key] = str(err)
    return out


def _worker(rank, port, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh

    from moegrad._testing import init_process_group_for_tests, rank_results
    from moegrad.fsdp import expert_parallel_fsdp, load_checkpoint, save_checkpoint

    init_process_group_for_tests(rank, WORLD, port, 30.0)
    with rank_results(out_dir, rank) as result:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
        result["bad"] = _bad_input(mesh)
        result["coords"] = mesh.get_coordinate()

        # gradients and two SGD steps against one process on the global batch
        ref = Tiny(0)
        model = Tiny(0)
        expert_parallel_fsdp(model, mesh, blocks=list(model.blocks))  # each block, then the root
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        result["steps"] = []
        for step in range(2):
            loss = _loss(model, *_batch(rank, step))
            loss.backward()
            ref_loss = _loss(ref, *_global_batch(step))
            ref_loss.backward()
            result["steps"].append({"loss": _mean_over_ranks(loss), "ref_loss": float(ref_loss.detach()),
                                    "grad_diff": _max_diffs(model, ref, grads=True)})
            opt.step()
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
            result["steps"][-1]["param_diff"] = _max_diffs(model, ref, grads=False)
        result["param_change"] = max(float((p.detach() - q.detach()).abs().max())
                                     for p, q in zip(ref.parameters(), Tiny(0).parameters()))

        # checkpoint round-trip after two AdamW steps
        def build(seed):
            m = expert_parallel_fsdp(Tiny(seed), mesh)  # the root alone
            return m, torch.optim.AdamW(m.parameters(), lr=1e-2)

        def train(m, o, step):
            loss = _loss(m, *_batch(rank, step))
            loss.backward()
            o.step()
            o.zero_grad()
            return _mean_over_ranks(loss)

        a, a_opt = build(1)
        for step in range(2):
            train(a, a_opt, step)
        path = os.path.join(out_dir, "ckpt")
        save_checkpoint(a, a_opt, path)
        with torch.no_grad():  # the outputs the saved weights give on this rank's probe batch
            result["probe_y"] = a(_batch(rank, 9)[0])[0].tolist()
        continued = [train(a, a_opt, step) for step in (2, 3)]
        b, b_opt = build(2)
        with torch.no_grad():
            before = _mean_over_ranks(_loss(b, *_batch(rank, 2)))
        load_checkpoint(b, b_opt, path)
        resumed = [train(b, b_opt, step) for step in (2, 3)]
        result["ckpt"] = {"continued": continued, "resumed": resumed, "fresh_before_load": before}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from moegrad._testing import free_port, spawn_and_wait

    out = tmp_path_factory.mktemp("fsdp")
    # ~30 s alone on 2 cores; generous on a loaded machine
    spawn_and_wait(_worker, (free_port(), str(out)), WORLD, 180, "the 4-process FSDP group")
    res = [json.load(open(out / f"rank{r}.json")) for r in range(WORLD)]
    for r in res:
        assert "error" not in r, r["error"]
    return {"ranks": res, "dir": out}


@pytest.fixture(scope="module")
def results(run):
    return run["ranks"]


def test_mesh_coordinates_cover_the_2x2_mesh(results):
    assert sorted(tuple(r["coords"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_loss_and_gathered_gradients_equal_one_process_on_the_global_batch(results):
    for r in results:
        for step in r["steps"]:
            assert step["loss"] == pytest.approx(step["ref_loss"], abs=TOL, rel=TOL)
            assert step["grad_diff"] < TOL, step
            assert step["param_diff"] < TOL, step
    assert results[0]["param_change"] > 1e-3  # the steps moved the parameters


def test_checkpoint_round_trip_continues_training_exactly(results):
    for r in results:
        ck = r["ckpt"]
        for got, want in zip(ck["resumed"], ck["continued"]):
            assert got == pytest.approx(want, abs=1e-6, rel=1e-6)
        assert abs(ck["fresh_before_load"] - ck["continued"][0]) > 1e-3  # loading mattered


def test_checkpoint_holds_every_expert_once_in_the_single_process_layout(run, tmp_path):
    """dcp_to_torch_save (one process, no group) turns the checkpoint into a plain state dict
    with experts [E, ...]; loaded into an unsharded model it reproduces every rank's outputs."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(run["dir"] / "ckpt"), str(tmp_path / "full.pt"))
    state = torch.load(tmp_path / "full.pt", weights_only=False)["model"]
    assert state["blocks.0.moe.experts.w1"].shape == (E, H, D)
    plain = Tiny(5)
    plain.load_state_dict(state)  # strict: every key, nothing left over
    with torch.no_grad():
        for rank, r in enumerate(run["ranks"]):
            y = plain(_batch(rank, 9)[0])[0]
            assert (y - torch.tensor(r["probe_y"])).abs().max() < TOL


def test_bad_mesh_and_models_raise_value_errors(results):
    bad = results[0]["bad"]
    assert "'data'" in bad["names"] and "mesh_dim_names=('dp', 'ep')" in bad["names"]
    assert "2-D" in bad["one_d"]
    assert "two different" in bad["same_dims"]
    assert "no moegrad.MoE" in bad["no_moe"]
    assert "'dense'" in bad["dense"]
    assert "submodules of model" in bad["blocks"]
    assert "differs across the mesh's ranks" in bad["differ"]
    assert "num_experts=3" in bad["odd_experts"] and "not divisible" in bad["odd_experts"]


def test_arguments_of_the_wrong_type_raise_type_errors_before_any_collective(tmp_path):
    """Checked in one process (no process group needed): swapped checkpoint arguments, a single
    block instead of a list, an mp_policy of the wrong type, a model that is not a module."""
    from moegrad import fsdp

    model, opt = Tiny(0), None
    with pytest.raises(TypeError, match=r"save_checkpoint: optimizer must be a torch.optim.Optimizer.*str"):
        fsdp.save_checkpoint(model, str(tmp_path), opt)
    with pytest.raises(TypeError, match=r"load_checkpoint: path must be a str or os.PathLike.*SGD"):
        fsdp.load_checkpoint(model, None, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"save_checkpoint: path must be a str or os.PathLike.*NoneType"):
        fsdp.save_checkpoint(model, None, None)
    with pytest.raises(TypeError, match=r"checkpoint_state: model must be a torch.nn.Module.*str"):
        fsdp.checkpoint_state("m")
    with pytest.raises(ValueError, match="full_expert_tensor: model was not sharded"):
        fsdp.full_expert_tensor(torch.zeros(1), model, "w1")
    with pytest.raises(TypeError, match=r"blocks must be an iterable.*got one Linear: pass \[block\]"):
        fsdp.expert_parallel_fsdp(model, None, blocks=nn.Linear(2, 2))
    with pytest.raises(TypeError, match="mp_policy must be a .*MixedPrecisionPolicy or None, got int"):
        fsdp.expert_parallel_fsdp(model, None, mp_policy=3)


def test_reference_model_is_deterministic():
    """The reference builds the same weights from a seed (what the ranks rely on)."""
    a, b = Tiny(0), copy.deepcopy(Tiny(0))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_example_runs_under_torchrun_and_resumes_to_the_same_loss():
    """examples/fsdp_expert_parallel.py as the README launches it (4 gloo processes), briefly."""
    import re
    from pathlib import Path

    from moegrad._testing import run_torchrun

    example = Path(__file__).resolve().parents[1] / "examples" / "fsdp_expert_parallel.py"
    res = run_torchrun(example, 4, ["--steps", 3], 240)
    assert res.returncode == 0, res.stderr[-2000:]
    first, last, resumed, continued = re.search(
        r"relative mse ([\d.]+) -> ([\d.]+); after the checkpoint round-trip the next step's loss "
        r"is ([\d.]+), continuing without it ([\d.]+)", res.stdout).groups()
    assert float(last) < float(first)
    assert float(resumed) == float(continued)
