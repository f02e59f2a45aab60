"""moegrad._testing: the torchrun helper never hangs, and leaves no rank behind."""

from __future__ import annotations

import os
import time

import pytest

from moegrad._testing import _descendants, run_torchrun

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc (Linux)")


def test_run_torchrun_kills_every_rank_on_timeout(tmp_path):
    """Ranks that never finish (torchrun starts each in its own session, out of reach of the
    launcher's process group): a TimeoutError after the deadline, and every rank is gone."""
    script = tmp_path / "stuck.py"
    pids = tmp_path / "pids"
    pids.mkdir()
    script.write_text("import os, time, pathlib\n"
                      f"pathlib.Path({str(pids)!r}, str(os.getpid())).touch()\n"
                      "time.sleep(600)\n")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out after 20 s"):
        run_torchrun(script, 2, [], 20)
    assert time.monotonic() - start < 60
    ranks = [int(p.name) for p in pids.iterdir()]
    assert len(ranks) == 2
    time.sleep(0.5)
    for pid in ranks:  # killed: gone, or a zombie until its parent (init) reaps it
        try:
            with open(f"/proc/{pid}/stat") as f:
                assert f.read().rsplit(")", 1)[1].split()[0] == "Z", pid
        except FileNotFoundError:
            pass


def test_descendants_lists_the_process_tree():
    assert os.getpid() in _descendants(os.getppid())
    assert os.getppid() not in _descendants(os.getpid())
