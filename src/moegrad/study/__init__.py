"""``moegrad study``: train the same small MoE model with each estimator and compare.

* tasks: :mod:`~moegrad.study.task` (the interface), :mod:`~moegrad.study.clusters` (ground-truth
  routing known), :mod:`~moegrad.study.charlm` (a char-level transformer LM on
  pydoc_data.topics) and their table :mod:`~moegrad.study.tasks`;
* one run: :mod:`~moegrad.study.train` (under a step and a wall-clock budget), with
  :mod:`~moegrad.study.flops` and :mod:`~moegrad.study.fidelity`;
* one cell: :mod:`~moegrad.study.settings` (resolved, checked settings),
  :mod:`~moegrad.study.runner` (:func:`run_study`), :mod:`~moegrad.study.progress`;
* a grid of cells: :mod:`~moegrad.study.grid` and :mod:`~moegrad.study.grid_runner`;
* the outputs: :mod:`~moegrad.study.metrics` (metrics.json), :mod:`~moegrad.study.stats`,
  :mod:`~moegrad.study.conclusions`, :mod:`~moegrad.study.markdown`,
  :mod:`~moegrad.study.report` (report.md), :mod:`~moegrad.study.summary` (a grid's
  summary.md) and :mod:`~moegrad.study.plots` (PNGs);
* :mod:`~moegrad.study.cli`: the command line.
"""

from __future__ import annotations

from moegrad._namespace import lazy_names, public_dir

__all__ = ["run_study", "TASKS", "Task", "get_task"]


#: ``run_study`` (it imports matplotlib, the plots) and the task table ``TASKS``, ``Task``,
#: ``get_task`` (torch), imported on first use: ``moegrad --help`` and ``moegrad study --help``
#: (importing :mod:`moegrad.study.cli`, hence this package) load neither
__getattr__ = lazy_names(__name__, {"run_study": "moegrad.study.runner", "TASKS": "moegrad.study.tasks",
                                    "Task": "moegrad.study.tasks", "get_task": "moegrad.study.tasks"})

__dir__ = public_dir(__name__, __all__)
