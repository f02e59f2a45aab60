"""Process-group helpers for the tests and the benchmarks' spawned processes (private: not part
of the public API).

A spawned gloo group on this machine needs a free TCP port (:func:`free_port`) and a bounded
timeout, so that a broken collective fails the test or benchmark instead of hanging
(:func:`init_process_group_for_tests`).
"""

from __future__ import annotations

import datetime
import socket

import torch.distributed as dist


def init_process_group_for_tests(rank: int, world: int, port: int, timeout_s: float = 60.0) -> None:
    """gloo on loopback with a bounded timeout (tests, benchmarks)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
