"""Module-level ``__getattr__`` / ``__dir__`` for the public packages (framework-free).

    __getattr__ = lazy_names(__name__, {"RoutingCallback": "moegrad.hf.callback"})
    __dir__ = public_dir(__name__, __all__)

``lazy_names``: names imported from their module on first use (and then kept in the package),
so importing the package does not import what they need (transformers, matplotlib, torch for
``moegrad --help``). ``public_dir``: ``dir(package)`` lists the public names and the loaded
public submodules, not the names the package's own code imports to work (``torch``, ``sys``).
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Iterable


def lazy_names(module: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A ``__getattr__`` for ``module``: ``exports`` {name: the module defining it} (the module
    itself when that is ``module.name``, a subpackage) imported on first use and kept in
    ``module``; any other name is an AttributeError."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        source = importlib.import_module(exports[name])
        value = source if source.__name__ == f"{module}.{name}" else getattr(source, name)
        setattr(sys.modules[module], name, value)
        return value

    return __getattr__


def public_dir(module: str, names: Iterable[str]) -> Callable[[], list[str]]:
    """A ``__dir__`` for ``module``: ``names`` (its ``__all__``) and the public submodules
    already loaded."""
    names = set(names)

    def __dir__() -> list[str]:
        loaded = {n for n in vars(sys.modules[module])
                  if not n.startswith("_") and f"{module}.{n}" in sys.modules}
        return sorted(names | loaded)

    return __dir__
