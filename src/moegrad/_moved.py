"""Names that moved to another module keep working from the old one for a while, with a
``DeprecationWarning`` that names the new place (framework-free).

    __getattr__ = moved_names(__name__, {"BiasBalancer": "moegrad.balancing"})
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable


def moved_names(module: str, moved: dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``module``: each name in ``moved`` {name: new module}
    is imported from its new module on first use, with a DeprecationWarning; any other name is
    an AttributeError as usual. The new module is imported at call time, not at the top, so the
    old module does not import it (the move was made to break that import)."""

    def __getattr__(name: str):
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} has moved to {moved[name]}.{name}; import it from there",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(moved[name]), name)

    return __getattr__
