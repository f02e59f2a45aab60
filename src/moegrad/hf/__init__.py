"""Hugging Face transformers integration: new router gradients for pretrained MoE models.

    import moegrad.hf
    model = AutoModelForCausalLM.from_pretrained(...)
    moegrad.hf.patch(model, estimator="dense", losses={"switch": 1e-2})  # in place; returns it
    out = model(input_ids, labels=labels)            # same forward as before (topk/dense/...)
    out.loss.backward()                              # LM loss + moegrad's balance losses
    moegrad.hf.unpatch(model)                        # original forward back

    # DeepSeek-V3: train e_score_correction_bias (HF keeps it frozen) after each optimizer step
    balancer = moegrad.BiasBalancer(model, gamma=1e-3)  # a patched DeepSeek-V3 model
    ...; optimizer.step(); balancer.step()

What patching computes, per-family notes, the forward policy, losses under Trainer, pickling
and checkpointing: docs/hf.md. The package, one file per concern (imports run top to bottom):

    families.py  Family, FAMILIES, supported()   which HF blocks, and their routing rule
    experts.py   HFExperts, GptOssExpertsView     HF expert weights as moegrad's experts
    router.py    HFRouter, routers()              moegrad's router over the HF gate
    forward.py   the patched block / gate forwards and their binding
    loss.py      aux_loss() and the task model's loss forward
    policy.py    which estimators keep a family's forward
    patch.py     patch(), unpatch()
    callback.py  RoutingCallback: routing health in transformers.Trainer's logs (imported on
                 first use: it imports transformers)
"""

from __future__ import annotations

from moegrad._namespace import lazy_names, public_dir

from moegrad.hf.experts import IMPLS, GptOssExpertsView, HFExperts
from moegrad.hf.families import FAMILIES, Family, supported
from moegrad.hf.loss import aux_loss
from moegrad.hf.patch import patch, unpatch
from moegrad.hf.router import HFRouter, routers

__all__ = ["patch", "unpatch", "routers", "aux_loss", "supported", "FAMILIES", "Family", "HFRouter",
           "HFExperts", "GptOssExpertsView", "IMPLS", "RoutingCallback"]

#: names imported on first use (the module imports transformers)
_LAZY = {"RoutingCallback": "moegrad.hf.callback"}


__getattr__ = lazy_names(__name__, _LAZY)


__dir__ = public_dir(__name__, __all__)
