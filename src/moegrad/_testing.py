"""Process-group helpers for the tests and the benchmarks' spawned processes (private: not part
of the public API).

A spawned gloo group on this machine needs a free TCP port (:func:`free_port`) and a bounded
timeout, so that a broken collective fails the test or benchmark instead of hanging
(:func:`init_process_group_for_tests`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def init_process_group_for_tests(rank: int, world: int, port: int, timeout_s: float = 60.0) -> None:
    """gloo on loopback with a bounded timeout (tests, benchmarks)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_wait(fn: Callable, args: tuple, world: int, timeout_s: float, what: str) -> None:
    """Run ``fn(rank, *args)`` in ``world`` spawned processes and wait for all of them; a rank's
    error is raised here, and a group still running after ``timeout_s`` is killed with a
    TimeoutError naming ``what`` (never a hang)."""
    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not finish in {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def run_torchrun(script: str, nproc: int, args: list, timeout_s: float) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=nproc script *args`` on a free port:
    after ``timeout_s`` the launcher and every rank (torchrun starts each in a session of its
    own) are killed and a TimeoutError carries the end of stderr (never a hang). Returns the
    completed process (stdout, stderr as text). The output goes through files, not pipes, so a
    rank left over can never keep the caller waiting."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(script), *map(str, args)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            for pid in _descendants(proc.pid):  # the ranks first: their own sessions
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            timed_out = True
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if timed_out:
        raise TimeoutError(f"torchrun {script} timed out after {timeout_s:.0f} s: {stderr[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _descendants(pid: int) -> list:
    """The pids of every process below ``pid`` (Linux ``/proc``; [] elsewhere)."""
    children: dict = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def exit_without_teardown() -> None:
    """End a spawned child whose results are written and whose process group is destroyed,
    skipping interpreter teardown: there gloo's threads sometimes abort it under pytest
    ("terminate called without an active exception", SIGABRT), after a correct result. Call it
    only on success (after the ``try``/``finally``), so a failing child still exits with its
    traceback."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def rank_results(out_dir: str, rank: int):
    """The body of a spawned rank of a multi-process test: yields a dict for its results. On
    leaving it writes the dict to ``out_dir/rank{rank}.json`` (an exception first adds
    ``"error": "Type: message"`` and is re-raised, so the child fails with its traceback),
    destroys the process group and, on success only, ends the process without interpreter
    teardown (:func:`exit_without_teardown`)."""
    results: dict = {}
    try:
        yield results
    except Exception as exc:  # reported by the test, not lost in the child's stderr
        results["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
    exit_without_teardown()
