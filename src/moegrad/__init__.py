"""moegrad: trainable, fast and measurable top-k expert selection for Mixture-of-Experts.

    import moegrad
    moe = moegrad.MoE(dim=64, hidden_dim=128, num_experts=8, top_k=2, estimator="dense")
    out = moe(x)                     # out.y, out.aux_loss, out.routing, out.stats
    moegrad.estimators.available()   # the estimator catalogue
"""

from moegrad import estimators, losses
from moegrad.experts import Experts
from moegrad.layer import MoE, MoEOutput, MoEStats
from moegrad.losses import BiasBalancer
from moegrad.routing import Router, RouterConfig, Routing

__version__ = "0.1.0"

__all__ = ["MoE", "MoEOutput", "MoEStats", "Router", "RouterConfig", "Routing", "Experts",
           "BiasBalancer", "estimators", "losses", "__version__"]
