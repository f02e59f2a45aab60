"""The table of study tasks: :data:`TASKS` (name -> class) and :func:`get_task`.

The tasks are :class:`~moegrad.study.clusters.Clusters` (Gaussian clusters, ground-truth routing
known) and :class:`~moegrad.study.charlm.CharLM` (a character-level transformer LM); the
interface they implement is :class:`~moegrad.study.task.Task`. The names of
:mod:`moegrad.study.task` are re-exported here, where they were defined before the split.
"""

from __future__ import annotations

from moegrad.study.charlm import CharLM
from moegrad.study.clusters import Clusters
from moegrad.study.task import REGIMES, ROUTER_INITS, ROUTER_STD, Probe, Task, init_router

__all__ = ["TASKS", "get_task", "Task", "Probe", "Clusters", "CharLM", "REGIMES", "ROUTER_INITS",
           "ROUTER_STD", "init_router"]

#: task name -> class, in the order ``moegrad study --help`` lists them
TASKS: dict[str, type[Task]] = {"clusters": Clusters, "charlm": CharLM}


def get_task(name: str) -> type[Task]:
    """The task class called ``name`` (ValueError naming the known tasks otherwise)."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is unknown; choose one of {sorted(TASKS)}")
    return TASKS[name]
