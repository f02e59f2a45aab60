"""``moegrad study``: train the same small MoE model with each estimator and compare.

* :mod:`~moegrad.study.tasks`: ``clusters`` (ground-truth routing known) and
  :mod:`~moegrad.study.charlm` (a char-level transformer LM on pydoc_data.topics);
* :mod:`~moegrad.study.train`: one run under a step and a wall-clock budget;
* :mod:`~moegrad.study.report` and :mod:`~moegrad.study.plots`: metrics.json, report.md, PNGs;
* :mod:`~moegrad.study.cli`: the command line (:func:`run_study` is its library form).
"""

from moegrad.study.cli import run_study
from moegrad.study.tasks import TASKS, Task, get_task

__all__ = ["run_study", "TASKS", "Task", "get_task"]
