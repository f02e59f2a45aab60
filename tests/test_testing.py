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


def _results_worker(rank, port, out_dir, fail):
    from moegrad._testing import init_process_group_for_tests, rank_results

    init_process_group_for_tests(rank, 1, port, 20.0)
    with rank_results(out_dir, rank) as results:
        results["x"] = 1
        if fail:
            raise ValueError("on purpose")


@pytest.mark.parametrize("fail", [False, True])
def test_rank_results_writes_what_the_rank_found_and_its_error(tmp_path, fail):
    """A rank's dict reaches the json file; an exception adds "error" and still fails the
    child (spawn_and_wait raises), so a failing rank is not mistaken for a finished one."""
    import json

    from moegrad._testing import free_port, spawn_and_wait

    args = (free_port(), str(tmp_path), fail)
    if fail:
        with pytest.raises(Exception, match="on purpose"):
            spawn_and_wait(_results_worker, args, 1, 60.0, "rank_results")
    else:
        spawn_and_wait(_results_worker, args, 1, 60.0, "rank_results")
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert got == ({"x": 1, "error": "ValueError: on purpose"} if fail else {"x": 1})
