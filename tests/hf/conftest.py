"""The moegrad.hf tests run tiny models: one intra-op thread per test module."""

from __future__ import annotations

import pytest

from tests.conftest import one_torch_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared CPU (restored after)."""
    with one_torch_thread():
        yield
