"""MLX tests: run PyTorch single-threaded meanwhile.

PyTorch's OpenMP workers spin-wait after each parallel region and starve MLX's own CPU threads:
on 2 busy cores the parity tests took ~10x longer with torch's default thread count.
The previous thread count is restored after each module.
"""

from __future__ import annotations

import pytest

from tests.conftest import one_torch_thread


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    with one_torch_thread():
        yield
