"""RoutingCallback: each MoE layer's routing health in ``transformers.Trainer``'s own logs.

    trainer = Trainer(model=model, args=args, train_dataset=data)   # model patched by moegrad.hf
    moegrad.hf.RoutingCallback().attach(trainer)     # before the report_to callbacks
    trainer.train()   # every logging_steps: "moe/model.layers.0.mlp/load_cv", ... in the logs

At each Trainer log (every ``logging_steps``) the values of a
:class:`moegrad.diagnostics.RoutingMonitor` over the forwards since the previous log (load CV,
max violation, dead experts, router entropy, dropped pairs, each balance loss; its docstring has
the definitions) are added to the ``logs`` dict in place and to the entry ``Trainer.log`` just
appended to ``state.log_history``. Callbacks after this one in the Trainer's list (TensorBoard,
W&B, ... from ``report_to``) then log them: :meth:`attach` puts it first; passed as
``Trainer(callbacks=[...])`` it comes after the reporting callbacks, which then miss the values
(``state.log_history`` still has them, and a warning says so when ``report_to`` is set). An
evaluation log gets the eval-mode forwards' values under ``eval_moe/...`` (``<prefix>_moe/...``
for ``evaluate(metric_key_prefix=...)``), a training log the training-mode forwards'
(TensorBoard shows them as ``train/moe/...`` and ``eval/moe/...``), whatever ``logging_steps``
and ``eval_steps`` are; ``predict()`` forwards are not logged. No extra forward pass: forward hooks read
what the patched blocks computed. The hooks stay after training (``trainer.evaluate()`` later
is logged too); ``callback.monitor.remove()`` takes them off. Each process reports its own
routing (no all-reduce).
"""

from __future__ import annotations

import warnings
from typing import Optional

from torch import nn
from transformers import TrainerCallback

from moegrad.diagnostics.monitor import RoutingMonitor

__all__ = ["RoutingCallback"]


class RoutingCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` adding a :class:`RoutingMonitor`'s values to every
    Trainer log (module docstring). ``model``: the patched model (or any model with moegrad
    MoE layers / routers); None takes the Trainer's model at ``on_train_begin``."""

    def __init__(self, model: Optional[nn.Module] = None) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"RoutingCallback: model must be an nn.Module or None, got {type(model).__name__}")
        self.model = model
        self.monitor: Optional[RoutingMonitor] = None
        self._attached = False
        self._warned = False
        if model is not None:
            self.monitor = RoutingMonitor(model)

    def attach(self, trainer) -> "RoutingCallback":
        """Put this callback first in ``trainer``'s callbacks (before the ``report_to`` ones, so
        they log its values); returns it."""
        handler = getattr(trainer, "callback_handler", None)
        if handler is None:
            raise TypeError(f"RoutingCallback.attach: trainer must be a transformers.Trainer, got "
                            f"{type(trainer).__name__}")
        handler.callbacks = [self] + [cb for cb in handler.callbacks if cb is not self]
        self._attached = True
        if self.monitor is None and isinstance(getattr(trainer, "model", None), nn.Module):
            self.monitor = RoutingMonitor(trainer.model)
        return self

    def on_init_end(self, args, state, control, model=None, **kwargs):
        """Watch the Trainer's model from the start (an ``evaluate()`` before ``train()`` too)."""
        if self.monitor is None and model is not None:
            self.monitor = RoutingMonitor(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.monitor is None:
            if model is None:
                raise ValueError("RoutingCallback: no model given and the Trainer passed none")
            self.monitor = RoutingMonitor(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.monitor is None or logs is None:
            return
        prefix = evaluation_prefix(logs)
        if prefix is not None:
            values = {f"{prefix}_{key}": value for key, value in self.monitor.read(mode="eval").items()}
        else:
            values = self.monitor.read(mode="train")
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
        reporting = [r for r in (getattr(args, "report_to", None) or []) if r != "none"]
        if reporting and not self._attached and not self._warned:
            self._warned = True
            warnings.warn("RoutingCallback was given as Trainer(callbacks=[...]), so it runs after the "
                          f"report_to callbacks {reporting}, which miss its values; use "
                          "RoutingCallback().attach(trainer)", UserWarning, stacklevel=2)

    def on_evaluate(self, args, state, control, **kwargs):
        """Forget eval-mode forwards the evaluation's log did not take (it reads them first)."""
        if self.monitor is not None:
            self.monitor.reset(mode="eval")

    def on_predict(self, args, state, control, **kwargs):
        """``Trainer.predict`` logs nothing: its forwards must not reach the next evaluation's log."""
        if self.monitor is not None:
            self.monitor.reset(mode="eval")


def evaluation_prefix(logs: dict) -> Optional[str]:
    """The ``metric_key_prefix`` of an evaluation log ("eval", "test", "eval_<dataset name>"),
    from the ``<prefix>_runtime`` and ``<prefix>_samples_per_second`` keys Trainer's speed
    metrics add to it (both: a user metric may end in "_runtime"); None for a training log
    (also the end-of-training summary, whose prefix is "train")."""
    for key in logs:
        prefix = key[: -len("_runtime")]
        if key.endswith("_runtime") and f"{prefix}_samples_per_second" in logs and prefix != "train":
            return prefix
    return "eval" if any(key.startswith("eval_") for key in logs) else None
