"""The names ``moegrad study``'s options choose from, without torch.

The parser (:mod:`moegrad.study.cli`) is built from this module and :mod:`moegrad._spec`
alone, so ``moegrad study --help`` imports no torch; the modules that train import these
names from here. Each tuple equals what the code it names accepts (tests/study/test_options.py
compares them).
"""

from __future__ import annotations

from moegrad._spec import PAIR_ROUTINGS, ROUTING_LOSSES, ROUTINGS, TOKEN_CHOICE_ROUTINGS

__all__ = ["TASK_NAMES", "REGIMES", "ROUTER_INITS", "ROUTER_STD", "IMPLS", "ROUTINGS",
           "TOKEN_CHOICE_ROUTINGS", "PAIR_ROUTINGS", "ROUTING_LOSSES", "BALANCERS",
           "ROUTING_ESTIMATORS", "NO_ESTIMATOR", "TASK_KNOBS", "FLAGS", "FIDELITY_TRAJECTORIES",
           "FIDELITY_TAUS", "layer_estimator"]

#: the study's tasks (:data:`moegrad.study.tasks.TASKS`), in the order ``--help`` lists them
TASK_NAMES = ("charlm", "clusters")
#: training regimes: from scratch, or fine-tuning a pretrained checkpoint on a shifted
#: distribution (:meth:`moegrad.study.task.Task.shifted`)
REGIMES = ("scratch", "finetune")
#: initial router weights: "zero" (every expert scores the same, the first routing is blind),
#: "normal" (N(0, ROUTER_STD^2), the ``initializer_range`` default of Hugging Face's Mixtral,
#: Qwen2-MoE and OLMoE configs), "uniform" (nn.Linear's own U(-1/sqrt(D), 1/sqrt(D)))
ROUTER_INITS = ("zero", "normal", "uniform")
ROUTER_STD = 0.02
#: the expert compute backends (:data:`moegrad.experts.IMPLS`)
IMPLS = ("auto", "bmm", "grouped_mm", "loop")
#: ``--balancer``: none, :class:`moegrad.BiasBalancer` (DeepSeek-V3's auxiliary-loss-free
#: bias) or :class:`moegrad.QuantileBalancer`, stepped after every optimiser step on layers
#: built with ``selection_bias=True``
BALANCERS = ("none", "bias", "quantile")
#: the name of the study's one "estimator" under ``routing="remoe"``, which takes none
#: (moegrad.MoE gets ``estimator=None``: ReLU gates are differentiable)
NO_ESTIMATOR = "remoe"
#: routing -> the estimators the study runs under it when it restricts them (the others run
#: every estimator that routing takes: all for topk, the deterministic ones for sinkhorn)
ROUTING_ESTIMATORS = {"expert_choice": ("topk",), "remoe": (NO_ESTIMATOR,)}

#: task -> {option name (run_study keyword): the task constructor's argument}
TASK_KNOBS = {"clusters": {"top_k": "top_k", "experts": "num_experts", "router_init": "router_init",
                           "lr": "lr", "clusters": "num_classes", "dim": "dim"},
              "charlm": {"top_k": "top_k", "experts": "num_experts", "router_init": "router_init",
                         "lr": "lr", "layers": "layers", "width": "dim"}}
#: option name (run_study keyword) -> its command-line flag
FLAGS = {"top_k": "--top-k", "experts": "--experts", "router_init": "--router-init",
         "lr": "--lr", "clusters": "--clusters", "dim": "--dim", "layers": "--layers",
         "width": "--width", "routing": "--routing", "balancer": "--balancer"}
#: trajectories whose checkpoints (steps 0, 1/4, 1/2, end of seed 0) every estimator's router
#: gradient is measured on (moegrad.study.fidelity.shared_checkpoint_fidelity)
FIDELITY_TRAJECTORIES = ("topk", "dense")
#: temperatures of the exact reference in the shared-checkpoint fidelity (a tau sweep)
FIDELITY_TAUS = (0.5, 1.0, 2.0)


def layer_estimator(name: str):
    """The study's estimator name -> moegrad.MoE's ``estimator=`` (:data:`NO_ESTIMATOR` -> None)."""
    return None if name == NO_ESTIMATOR else name
