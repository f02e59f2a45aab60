"""Run every cell of a study grid (each a :func:`moegrad.study.runner.run_cell` into its own
subdirectory, one progress bar over all of them) and write the grid summary."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from moegrad.study.grid import cell_name, grid_cells
from moegrad.study.progress import Progress
from moegrad.study.runner import run_cell
from moegrad.study.settings import FLAGS, TASK_KNOBS, Cell
from moegrad.study.summary import write_grid_summary


def run_grid(grid: dict, *, out: Path, command: str = "moegrad study",
             cell_commands: Optional[dict] = None, progress: bool = True, **study) -> list[dict]:
    """Run :func:`~moegrad.study.runner.run_study` for every cell of ``grid`` ({key: [values]},
    keys from :data:`~moegrad.study.grid.GRID_KEYS`) into ``out/<cell name>`` and write the grid
    summary (:func:`moegrad.study.summary.write_grid_summary`). ``study`` holds run_study's other keywords
    (the base every cell starts from; a key of the grid must not be among them). Every cell is
    checked before anything trains. Returns the per-cell documents."""
    names = {"top_k": "top_k", "experts": "experts", "losses": "losses",
             "router_init": "router_init", "lr": "lr", "regime": "regime", "task": "task_name",
             "routing": "routing", "balancer": "balancer"}
    for key in grid:
        if study.get(names.get(key, key)) is not None and key != "task":
            raise ValueError(f"{key} is both in the grid and given as its own option "
                             f"({FLAGS.get(key, '--' + key.replace('_', '-'))}); give it once")
    out = Path(out)
    cells = grid_cells(grid)
    bar = Progress(progress, "study grid")
    plans = []
    for cell in cells:
        kwargs = dict(study)
        for key, value in cell.items():
            kwargs[names[key]] = value
        task_name = kwargs.pop("task_name", "clusters")
        options = {k: kwargs.pop(k, None) for k in ("top_k", "experts", "router_init", "lr",
                                                    "clusters", "dim", "layers", "width")}
        if len({c.get("task") for c in cells}) > 1:  # a knob of the other task: not this cell's
            knobs = TASK_KNOBS[task_name]
            options = {k: (v if k in knobs else None) for k, v in options.items()}
        spec = Cell(task_name, kwargs.pop("estimators", None), quick=kwargs.pop("quick", False),
                    steps=kwargs.pop("steps", None), seeds=kwargs.pop("seeds", None),
                    time_budget=kwargs.pop("time_budget", None),
                    losses=kwargs.pop("losses", None), eval_every=kwargs.pop("eval_every", None),
                    diag_every=kwargs.pop("diag_every", None),
                    diag_samples=kwargs.pop("diag_samples", 8), tau=kwargs.pop("tau", 1.0),
                    impl=kwargs.pop("impl", "auto"), regime=kwargs.pop("regime", None),
                    pretrain_steps=kwargs.pop("pretrain_steps", None), options=options,
                    flops_budget=kwargs.pop("flops_budget", None),
                    routing=kwargs.pop("routing", None), balancer=kwargs.pop("balancer", None))
        fidelity = kwargs.pop("fidelity", True)
        if kwargs:
            raise TypeError(f"run_grid got unexpected keywords {sorted(kwargs)}")
        plans.append((cell, cell_name(cell), spec, fidelity))
    if len({name for _, name, _, _ in plans}) != len(plans):
        raise ValueError("two grid cells have the same name; make the grid values distinct")
    for _, name, spec, _ in plans:
        spec.price(bar, name)
    bar.start()
    docs = []
    for _, name, spec, fidelity in plans:
        cmd = (cell_commands or {}).get(name, f"{command}  # grid cell {name}")
        docs.append(run_cell(spec, out / name, cmd, bar, name, fidelity))
    bar.close()
    write_grid_summary(docs, out, command)
    return docs
