"""Every module of the package imports on its own, and the module-level imports form no cycle.

A cycle hidden by a function-level import still works at runtime but ties two concepts
together (DESIGN.md §6: no import cycles, imports at module top). The graph is read with
``ast`` from each module's top-level ``import`` / ``from`` statements (``if TYPE_CHECKING:``
blocks and function bodies excluded); importing ``a.b.c`` also runs the ``__init__`` of ``a.b``,
so that package is an edge too (``moegrad/__init__.py`` itself imports its names lazily).
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "moegrad"


def _modules() -> dict[str, pathlib.Path]:
    """Dotted name -> file of every module under src/moegrad (packages by their __init__.py)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(tree: ast.Module) -> list:
    """Import statements run at import time: module level, inside if/try/with blocks, never in
    function or class bodies' functions, never under ``if TYPE_CHECKING``."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                todo += node.body
            todo += node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody
            for handler in node.handlers:
                todo += handler.body
        elif isinstance(node, (ast.With, ast.ClassDef)):
            todo += [n for n in node.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return found


def _targets(name: str, node) -> set:
    """Modules of the package a statement of module ``name`` makes Python import."""
    is_package = MODULES[name].name == "__init__.py"
    if isinstance(node, ast.Import):
        wanted = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = name.split(".") if is_package else name.split(".")[:-1]
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        wanted = [base] + [f"{base}.{alias.name}" for alias in node.names]
    out = set()
    for target in wanted:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # the target and the packages above it
            out.add(".".join(parts[:i]))
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    # the root package is lazy; a module's own packages are being imported already
    return {t for t in out if t in MODULES and t != "moegrad" and t not in own_packages and t != name}


def _graph() -> dict[str, set]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = set().union(*(_targets(name, n) for n in _top_level_imports(tree)), set())
    return graph


def _find_cycle(graph: dict[str, set]):
    """A cycle as a list of modules [a, b, ..., a], or None (iterative depth-first search)."""
    state = {}  # 1 on the stack, 2 done
    for root in sorted(graph):
        if state.get(root):
            continue
        stack, path = [(root, iter(sorted(graph[root])))], [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_the_graph_reader_sees_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    tree = ast.parse("import os\nif TYPE_CHECKING:\n    import moegrad.layer\n"
                     "def f():\n    import moegrad.routing\n"
                     "try:\n    import moegrad.losses\nexcept ImportError:\n    pass\n")
    assert [ast.unparse(n) for n in _top_level_imports(tree)] == ["import os", "import moegrad.losses"]


def test_the_graph_has_the_known_edges():
    graph = _graph()
    assert "moegrad.routing" in graph["moegrad.layer"]
    # importing moegrad.estimators.base runs moegrad/estimators/__init__.py
    assert "moegrad.estimators" in graph["moegrad.distributed"]
    # the collectives are a leaf; the layer and the losses do not import the EP conversion
    assert graph["moegrad._collectives"] == set()
    assert not {"moegrad.distributed", "moegrad.balancing"} & (graph["moegrad.layer"] | graph["moegrad.losses"])
    # estimators get a Selection, never the router module
    assert not any("moegrad.routing" in graph[name] for name in graph if name.startswith("moegrad.estimators"))
    assert any(name.startswith("moegrad.mlx") for name in graph) and any(
        name.startswith("moegrad.hf") for name in graph)


def test_module_level_imports_have_no_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _layout_order() -> list:
    """The top-level modules and subpackages in the order README's Layout lists them."""
    readme = (SRC.parent / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1].split("\ntests/", 1)[0]
    names = re.findall(r"(?:^\s{4}|\s{3})(\w+)(?:\.py|/)\s", block, flags=re.M)
    return list(dict.fromkeys(names))


def test_no_module_imports_one_listed_below_it_in_readme_layout():
    """README's Layout lists the package bottom-up: each module-level import goes to a module
    listed above (or inside the same subpackage)."""
    order = _layout_order()
    top = {name: name.split(".")[1] for name in MODULES if name.count(".")}
    assert set(top.values()) - {"__init__"} <= set(order), set(top.values()) - set(order)
    upward = sorted((a, b) for a, targets in _graph().items() for b in targets
                    if a in top and b in top and top[a] != top[b] and top[a] in order
                    and top[b] in order and order.index(top[b]) > order.index(top[a]))
    assert not upward, upward


#: run in a fresh interpreter: import the framework once, then fork one child per module, which
#: imports that module alone (nothing of moegrad is loaded before the fork), and report failures
_DRIVER = """
import importlib, json, os, sys, traceback
importlib.import_module(sys.argv[1])
names, failed, running = sys.argv[2:], {}, {}
def reap():
    pid, status = os.wait()
    name, path = running.pop(pid)
    if status:
        failed[name] = open(path).read()[-2000:]
    os.unlink(path)
for i, name in enumerate(names):
    if len(running) >= 4:
        reap()
    path = f"{sys.argv[0]}.{i}.err"
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            importlib.import_module(name)
        except BaseException:
            code = 1
            with open(path, "w") as f:
                f.write(traceback.format_exc())
        os._exit(code)
    open(path, "a").close()
    running[pid] = (name, path)
while running:
    reap()
print(json.dumps(failed))
"""


def _import_each_alone(framework: str, names: list, tmp_path) -> dict:
    """{module: traceback} for the modules that fail to import on their own."""
    script = tmp_path / f"import_{framework.replace('.', '_')}.py"
    script.write_text(_DRIVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script), framework, *names], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _has_mlx(tmp_path) -> bool:
    """mlx importable (run outside the repository, whose tests/mlx would shadow it)."""
    return subprocess.run([sys.executable, "-c", "import mlx.core"], cwd=tmp_path,
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks one child per module")
def test_every_module_imports_alone(tmp_path):
    mlx = [name for name in MODULES if name.startswith("moegrad.mlx")]
    rest = [name for name in MODULES if name not in mlx]
    assert len(rest) > 30 and mlx
    failed = _import_each_alone("torch", rest, tmp_path)
    if _has_mlx(tmp_path):  # the MLX backend never loads torch: import it with mlx only
        failed.update(_import_each_alone("mlx.core", mlx, tmp_path))
    assert not failed, "\n\n".join(f"import {name} failed:\n{err}" for name, err in failed.items())
