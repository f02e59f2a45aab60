"""The moegrad command's help loads no torch; the public packages' dir() shows public names only."""

import json
import os
import subprocess
import sys

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def fresh(code: str) -> str:
    """Run ``code`` in a fresh interpreter with moegrad on the path; its stdout."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


HELP = """
import contextlib, io, json, sys
from moegrad.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main({argv!r})
    except SystemExit as e:
        code = e.code
print(json.dumps({{"code": code, "help": out.getvalue(), "torch": "torch" in sys.modules}}))
"""


@pytest.mark.parametrize("argv, expect", [(["--help"], "bench"), ([], "study"),
                                          (["bench", "--help"], "--world-size"),
                                          (["study", "--help"], "--balancer")])
def test_help_imports_no_torch(argv, expect):
    result = json.loads(fresh(HELP.format(argv=argv)).splitlines()[-1])
    assert result["code"] in (0, 2) and expect in result["help"]
    assert result["torch"] is False


def test_a_command_still_gets_its_arguments():
    from moegrad.cli import build_parser

    args = build_parser(["bench"]).parse_args(["bench", "--impls", "loop,bmm", "--estimators", "dense"])
    assert args.impls == ["loop", "bmm"] and args.estimators == ["dense"]
    with pytest.raises(SystemExit):
        build_parser(["bench"]).parse_args(["bench", "--impls", "nope"])


@pytest.mark.parametrize("package", ["moegrad", "moegrad.hf", "moegrad.diagnostics", "moegrad.bench",
                                     "moegrad.estimators", "moegrad.study", "moegrad.mlx"])
def test_dir_shows_public_names_only(package):
    if package == "moegrad.mlx":
        pytest.importorskip("mlx.core")
    names = json.loads(fresh(f"import json, importlib; print(json.dumps(dir(importlib.import_module({package!r}))))"))
    module = __import__(package, fromlist=["_"])
    assert set(module.__all__) <= set(names)
    leaked = {"torch", "nn", "F", "Optional", "Tensor", "annotations", "importlib", "sys", "make_registry"}
    assert not leaked & set(names), leaked & set(names)
    assert all(not n.startswith("_") or n == "__version__" for n in names)
