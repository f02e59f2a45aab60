"""Diagnostics: how faithful is a router gradient, and how healthy is the routing?

* :mod:`~moegrad.diagnostics.expected`: the exact expected loss of a sampled top-k policy
  (every subset enumerated, score or unit forward weights) and the dense-mixture loss;
* :mod:`~moegrad.diagnostics.fidelity`: each estimator's router gradient (from a real
  :class:`moegrad.MoE`) against those references, the exact one under the estimator's own
  forward weight rule: cosine (of the mean and per sample), relative error, bias and variance;
* :mod:`~moegrad.diagnostics.health`: load, load CV, max violation, entropy, dead experts,
  purity against a known assignment;
* :mod:`~moegrad.diagnostics.drift`: routing drift between two models with the same layers
  (:func:`compare_routing`: top-k overlap, Jensen-Shannon divergence, revived/killed experts);
* :mod:`~moegrad.diagnostics.monitor`: :class:`RoutingMonitor`, each MoE layer's load CV, max
  violation, dead experts, entropy, drops and balance losses during training, from forward hooks.
"""

from moegrad._namespace import public_dir

from moegrad.diagnostics.drift import compare_routing, js_divergence, router_layers, topk_overlap
from moegrad.diagnostics.expected import (WEIGHT_RULES, dense_mixture_loss, expected_loss,
                                          subset_probabilities, subset_weights, subsets)
from moegrad.diagnostics.fidelity import (Fidelity, ReferenceGradients, WeightRule,
                                          check_enumerable, clone_with_estimator, cosine,
                                          estimator_gradients, fidelity, gradient_fidelity,
                                          reference_gradients, relative_error, weight_rule)
from moegrad.diagnostics.health import (LoadWindow, confusion, expert_load, load_cv, max_violation,
                                        purity, router_entropy, routing_health)
from moegrad.diagnostics.monitor import RoutingMonitor

__all__ = ["WEIGHT_RULES", "dense_mixture_loss", "expected_loss", "subset_probabilities",
           "subset_weights", "subsets", "Fidelity", "ReferenceGradients", "WeightRule",
           "check_enumerable", "clone_with_estimator", "cosine", "estimator_gradients",
           "fidelity", "gradient_fidelity", "reference_gradients", "relative_error", "weight_rule",
           "LoadWindow", "confusion", "expert_load", "load_cv", "max_violation", "purity",
           "router_entropy", "routing_health", "compare_routing", "js_divergence",
           "router_layers", "topk_overlap", "RoutingMonitor"]


__dir__ = public_dir(__name__, __all__)
