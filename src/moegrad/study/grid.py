"""A grid of study cells: its keys, the cross product of their values, and each cell's name
(the subdirectory of ``--out`` it is written to, e.g. ``k2_switch0.01``)."""

from __future__ import annotations

import itertools

#: grid keys, in the order cell names list them
GRID_KEYS = ("task", "regime", "top_k", "experts", "losses", "router_init", "lr", "routing", "balancer")


def grid_cells(grid: dict) -> list[dict]:
    """{key: [values]} -> the cross product as a list of {key: value} (keys in grid order)."""
    for key in grid:
        if key not in GRID_KEYS:
            raise ValueError(f"grid key {key!r} is unknown; choose from {list(GRID_KEYS)}")
        if not grid[key]:
            raise ValueError(f"grid key {key!r} has no values")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def cell_name(cell: dict) -> str:
    """A short directory name from a grid cell's values, e.g. ``k2_e16_switch0.01``."""
    parts = []
    for key in GRID_KEYS:
        if key not in cell:
            continue
        v = cell[key]
        if key == "top_k":
            parts.append(f"k{v}")
        elif key == "experts":
            parts.append(f"e{v}")
        elif key == "losses":
            parts.append("+".join(f"{n}{c:g}" for n, c in v.items()) or "noloss")
        elif key == "router_init":
            parts.append(f"init-{v}")
        elif key == "lr":
            parts.append(f"lr{v:g}")
        elif key == "balancer":
            parts.append(f"bal-{v}")
        else:
            parts.append(str(v))
    return "_".join(parts) or "default"
