"""The progress bar of a study or grid, over the estimated seconds of all its runs.

Each run is priced before training from a short warm-up (:func:`moegrad.study.train.time_costs`);
see :class:`Progress`.
"""

from __future__ import annotations

import sys
import warnings

from moegrad.study.train import time_costs


class Progress:
    """A tqdm bar over the estimated seconds of the whole study (or grid).

    tqdm's own ETA divides the steps left by the recent step rate; in a study the runs differ
    in speed (``dense`` costs more per step than ``topk``, evaluations and gradient diagnostics
    come in bursts, charlm is slower than clusters), so that estimate is wrong at the start
    and jumps between runs. Instead every run is priced before training from a short warm-up
    (:func:`moegrad.study.train.time_costs`: 3 timed steps, one evaluation, one diagnostic per
    estimator on a throwaway model), the bar's total is the sum of those prices in seconds,
    each step advances it by its run's price per step (evaluations and diagnostics spread
    over the steps), and tqdm's rate is the average since the start (smoothing 0), so the ETA
    is sensible from the first steps and corrects itself if the machine is busier than during
    the warm-up. The postfix shows the current run and the steps done.
    """

    def __init__(self, enabled: bool, desc: str) -> None:
        self.enabled, self.desc = enabled, desc
        self.total, self.bar, self.steps_total, self.steps_done = 0.0, None, 0, 0
        self._costs: dict = {}

    def price(self, key, task, names, *, losses, diag: bool, diag_samples: int, tau: float) -> dict:
        """Measure (once per key) the time costs of each estimator on ``task``."""
        if not self.enabled:
            return {}
        if key not in self._costs:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "estimator=.* gives the router no task gradient",
                                        UserWarning)
                self._costs[key] = {n: time_costs(task, n, losses=losses, diag=diag,
                                                  diag_samples=diag_samples, tau=tau)
                                    for n in names}
        return self._costs[key]

    def add(self, seconds: float, steps: int = 0) -> None:
        self.total += seconds
        self.steps_total += steps

    def start(self) -> None:
        if self.enabled and self.bar is None:
            # imported here, not at the top: tqdm is an optional dependency (the ``study``
            # extra), needed only for a visible bar (``--no-progress`` runs without it)
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max(self.total, 1e-9), smoothing=0.0, file=sys.stderr,
                            desc=self.desc, bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                            "[{elapsed}<{remaining}]{postfix}")

    def run(self, label: str, steps: int, seconds: float):
        """-> (on_step callback, finish callback) for one run priced ``seconds``."""
        per_step = seconds / max(steps, 1)
        state = {"done": 0.0}

        def on_step() -> None:
            self.steps_done += 1
            state["done"] += per_step
            if self.bar is not None:
                self._advance(per_step)
                if self.steps_done % 50 == 0:
                    self.bar.set_postfix_str(f"{label}, step {self.steps_done}/{self.steps_total}",
                                             refresh=False)

        def finish(steps_run: int = steps) -> None:
            self.steps_done += steps - steps_run  # steps a time-limited run did not take
            if self.bar is not None:
                self._advance(seconds - state["done"])

        if self.bar is not None:
            self.bar.set_postfix_str(f"{label}, step {self.steps_done}/{self.steps_total}")
        return on_step, finish

    def _advance(self, seconds: float) -> None:
        """Move the bar by ``seconds`` of priced work, never past its total (float sums of the
        per-step shares can overshoot it by rounding, which tqdm shows as a negative ETA)."""
        seconds = min(seconds, self.bar.total - self.bar.n)
        if seconds > 0:
            self.bar.update(seconds)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_seconds(cost: dict, steps: int, eval_every: int, diag_every: int) -> float:
    """Price of one run in seconds from its warm-up ``cost`` ({"step", "eval", "diag"}: seconds
    each): steps, evaluations every ``eval_every`` steps, diagnostics every ``diag_every``
    (0: none); ``steps`` itself without a cost (an unpriced bar counts steps)."""
    if not cost:
        return float(steps)
    evals = steps // eval_every + 2
    diags = (steps // diag_every + 2) if diag_every else 0
    return steps * cost["step"] + evals * cost["eval"] + diags * cost["diag"]
