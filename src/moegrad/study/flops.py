"""FLOPs of one training step (forward + backward), counted from what the step evaluated.

Convention: that of ``torch.utils.flop_counter.FlopCounterMode`` (and of the "6 N D" rule of
Kaplan et al. 2020, Hoffmann et al. 2022): only matrix products count, 2 FLOPs per
multiply-add. A product [m, k] x [k, n] costs 2 m k n forward; its backward computes the
gradient of each operand that needs one, 2 m k n each. A weight applied to a token thus costs
2 (forward) + 2 (weight gradient) + 2 (input gradient, when the input carries one) = 6 FLOPs.
Elementwise work (activations, softmax, top-k, sampling, normalisation, losses), gathers and
scatters, and the padding rows of the ``bmm`` expert backend are not counted; optimizer
updates and evaluation are not part of a training step's count.

Per :class:`moegrad.MoE` layer and step; T tokens, D model dim, H hidden dim, E experts, K top-k,
N routed (token, expert) pairs the experts evaluated (T*K minus pairs dropped by capacity),
m weight matrices per expert (3 for SwiGLU: w1, w3, w2; 2 for GELU: w1, w2):

  experts     forward 2 m D H N; backward: every weight's gradient 2 m D H N, the gradient of the
              activation through w2 2 D H N, and through w1 (and w3) 2 (m-1) D H N more when the
              layer's input carries a gradient (``input_grad``)
  router      gate logits x W^T: forward 2 T D E; when a gradient reaches the router (its
              weights carry one, ``dense``/``default_moe`` add one, or a balance loss is on; not
              for ``unweighted`` without losses) weight gradient 2 T D E and input gradient
              2 T D E when ``input_grad``
  combine     y_t = sum_k w_tk e_tk: forward 2 T K D when K > 1 (K = 1 is an elementwise
              scale), weight gradient 2 T K D when the weights carry a gradient (all but
              ``unweighted``); under expert_choice and remoe (``Routing.chosen``) N is the
              number of chosen pairs and the combine is counted as 2 N D forward (+ 2 N D for
              the weight gradient), an estimate: it is not compared with FlopCounterMode
  unselected  ``dense`` only, in backward: the T*(E-K) unselected pairs, each
              <w2_i^T g, act(w1_i x, w3_i x)> (:func:`moegrad.experts.unselected_inner_products`):
              the m up/down matrices once, 2 m D H per pair (the last dot over H is elementwise)
  estimator   ``default_moe``: m = coef [T, E] @ ebar [E, D], forward 2 T E D and the gradient
              of coef 2 T E D; ``noisy_topk``: the noise gate x W_noise^T, priced as the router gate

The remaining layers of a model (attention, embeddings, head) are counted by the task's
:meth:`~moegrad.study.task.Task.backbone_flops`; they are the same for every estimator.
"""

from __future__ import annotations

COMPONENTS = ("experts", "router", "combine", "unselected", "estimator", "backbone")


def moe_flops(moe, out, *, input_grad: bool) -> dict:
    """FLOPs of one forward + backward of ``moe`` (a :class:`moegrad.MoE`) from its training
    output ``out`` (a :class:`moegrad.MoEOutput`), per component of the module docstring.

    ``input_grad``: whether the layer's input needs a gradient (True inside a network, False
    when the input is data). The counts follow what moegrad's code computes; the test compares
    them with ``torch.utils.flop_counter.FlopCounterMode`` on the ``loop`` backend.
    """
    routing = out.routing
    tokens, top_k = routing.indices.shape
    chosen = routing.chosen  # [T, E] under expert_choice / remoe: only those pairs are dispatched
    experts = moe.experts
    dim, hidden, num_experts = experts.dim, experts.hidden_dim, experts.num_experts
    mats = 2 if experts.stacked_weights().up is None else 3  # gate, down (+ up for SwiGLU)
    if chosen is not None:
        pairs = int(chosen.sum())
    elif moe.capacity_factor is None and routing.mask is None:
        pairs = tokens * top_k  # dropless, no padding: every selected pair is evaluated
    else:
        pairs = int(out.stats.tokens_per_expert.sum()) - int(out.stats.dropped)
    name = moe.router.estimator.name
    grads = routing.scores.requires_grad  # the router is being trained (always in a study step)
    reached = grads and (routing.weights.requires_grad or name in ("dense", "default_moe")
                         or any(c != 0 for c in moe.losses.values()))
    mac = 2
    result = dict.fromkeys(COMPONENTS[:-1], 0)
    result["experts"] = mac * dim * hidden * pairs * (
        mats + mats + 1 + ((mats - 1) if input_grad else 0))
    gate = mac * tokens * dim * num_experts
    result["router"] = gate * (1 + ((2 if input_grad else 1) if reached else 0))
    if chosen is not None:  # the weighted sum over the chosen pairs only (forward, weight grad)
        result["combine"] = mac * pairs * dim * (1 + (1 if routing.weights.requires_grad else 0))
    else:
        result["combine"] = (mac * tokens * top_k * dim * (1 if top_k > 1 else 0)
                             + (mac * tokens * top_k * dim if routing.weights.requires_grad else 0))
    if name == "dense" and grads:
        result["unselected"] = mac * mats * dim * hidden * tokens * (num_experts - top_k)
    elif name == "default_moe" and (grads or moe.router.estimator.forward_defaults):
        product = mac * tokens * num_experts * dim
        result["estimator"] = product * (2 if grads else 1)
    elif name == "noisy_topk":
        result["estimator"] = gate * (2 + (1 if input_grad else 0))
    return result


def step_flops(task, model, batch, outs) -> dict:
    """FLOPs of one training step of ``task``'s ``model`` on ``batch`` whose MoE layers gave
    ``outs`` (in :meth:`~moegrad.study.task.Task.moes` order): a dict per component and
    ``"total"``."""
    total = dict.fromkeys(COMPONENTS, 0)
    for moe, out in zip(task.moes(model), outs):
        for key, value in moe_flops(moe, out, input_grad=task.moe_input_grad).items():
            total[key] += value
    total["backbone"] = int(task.backbone_flops(batch))
    total["total"] = sum(total[k] for k in COMPONENTS)
    return total
