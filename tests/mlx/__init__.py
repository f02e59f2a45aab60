"""Tests of moegrad.mlx. They skip, printing the import error, only where MLX cannot be imported."""

from __future__ import annotations

import importlib

import pytest

HINTS = {"mlx.core": "pip install 'moegrad[mlx]'", "mlx_lm": "pip install mlx-lm"}


def need(name: str):
    """Import ``name`` or skip the calling test module with the reason (and the error) printed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"{name} cannot be imported: {exc} ({HINTS.get(name, 'install it')})",
                    allow_module_level=True)
