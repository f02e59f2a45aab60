"""Process-group helpers for the tests and the benchmarks' spawned processes (private: not part
of the public API).

A spawned gloo group on this machine needs a free TCP port (:func:`free_port`) and a bounded
timeout, so that a broken collective fails the test or benchmark instead of hanging
(:func:`init_process_group_for_tests`).
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
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
    """``python -m torch.distributed.run --nproc_per_node=nproc script *args`` on a free port, in
    its own session: after ``timeout_s`` the launcher and every rank are killed and a
    TimeoutError carries the end of stderr (never a hang). Returns the completed process
    (stdout, stderr as text)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(script), *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise TimeoutError(f"torchrun {script} timed out after {timeout_s:.0f} s: {stderr[-2000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def exit_without_teardown() -> None:
    """End a spawned child whose results are written and whose process group is destroyed,
    skipping interpreter teardown: there gloo's threads sometimes abort it under pytest
    ("terminate called without an active exception", SIGABRT), after a correct result. Call it
    only on success (after the ``try``/``finally``), so a failing child still exits with its
    traceback."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
