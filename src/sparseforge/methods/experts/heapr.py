"""HEAPr-style expert pruning (Li et al., ICLR 2026): second-order saliency of atomic experts, summed per expert.

An expert is a sum of atomic experts, one per intermediate neuron j: token x routed to expert e with routing
weight g contributes g * a_j(x) * w_j to the block output, where a_j(x) = act(gate_j . x) * (up_j . x) and w_j is
column j of the down projection. Removing atomic expert j perturbs the output of that token by
delta = -g a_j(x) w_j. A second-order expansion of the language-model loss in the block's *output* space, with
the gradient term dropped (the calibrated model is taken to sit at a minimum, as in Optimal Brain Surgeon) and
the output Hessian replaced by the empirical Fisher (the outer product of the loss gradient G = dL/dy at that
token), gives

    S(e, j) = 1/2 * sum over tokens t routed to e of (g_t * a_j(x_t) * (w_j . G_t))^2

which needs one forward and one backward pass and only [tokens, intermediate] sized work per expert, never a
parameter-space Hessian. HEAPr prunes atomic experts themselves; transformers' configs hold one intermediate size
for every expert, so here the atomic saliencies are summed per expert (`aggregate: atomic`, HEAPr's
block-diagonal view) or the whole expert's removal is scored jointly (`aggregate: expert`:
1/2 sum_t (g_t * y_e(x_t) . G_t)^2, which keeps the interactions between an expert's neurons), and the
lowest-scoring whole experts go, as in expert-prune.
"""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.core.moe import MoEBlock, RoutingRecorder
from sparseforge.methods.base import param, register
from sparseforge.methods.experts.base import ExpertMethod, Plan, keep_highest


@dataclasses.dataclass
class HeaprParams:
    ratio: float = param(0.25, "fraction of each MoE block's routed experts removed (lowest saliency), in (0, 1); at least top_k must stay")
    aggregate: str = param("atomic", "expert score: 'atomic' (sum of its neurons' saliencies, HEAPr) or 'expert' (the whole expert's removal, jointly)",
                           ("atomic", "expert"))


def atomic_saliency(weights: dict[str, torch.Tensor], act, x: torch.Tensor, g: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per intermediate neuron j of one expert: 1/2 sum_t (g_t a_j(x_t) (w_j . grad_t))^2.

    weights: gate [I, H], up [I, H], down [H, I]; x [n, H] the tokens routed to the expert, g [n] their routing
    weights, grad [n, H] the loss gradient at the block output for those tokens."""
    a = act(x @ weights["gate"].T) * (x @ weights["up"].T)  # [n, I]
    return 0.5 * ((g[:, None] * a * (grad @ weights["down"])) ** 2).sum(0)


def expert_saliency(weights: dict[str, torch.Tensor], act, x: torch.Tensor, g: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """1/2 sum_t (g_t y_e(x_t) . grad_t)^2: the same second-order term for removing the whole expert at once."""
    y = (act(x @ weights["gate"].T) * (x @ weights["up"].T)) @ weights["down"].T  # [n, H]
    return 0.5 * ((g * (y * grad).sum(-1)) ** 2).sum()


@register
class Heapr(ExpertMethod):
    name = "heapr"
    summary = "HEAPr: remove the experts of every MoE block whose atomic experts (neurons) have the lowest second-order output-space saliency"
    Params = HeaprParams
    keep_calls = True

    def start(self, model, blocks: list[MoEBlock]) -> None:
        self.atomic = {b.layer_index: torch.zeros(b.num_experts, b.intermediate_size, dtype=torch.float64) for b in blocks}
        self.joint = {b.layer_index: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks}

    def collect(self, model, blocks: list[MoEBlock], ids: torch.Tensor, recorder: RoutingRecorder) -> None:
        grads: dict[int, list[torch.Tensor]] = {b.layer_index: [] for b in blocks}
        handles = []

        def watch(block):
            def hook(module, args, output):
                out = output[0] if isinstance(output, (tuple, list)) else output
                out.register_hook(lambda g: grads[block.layer_index].append(g.detach().reshape(-1, block.hidden_size)))
            return hook

        for b in blocks:
            # The fused experts module returns exactly the routed experts' weighted sum; the ModuleList form has no
            # call of its own, so its block's output (routed + shared: the same gradient) is watched instead.
            handles.append((b.experts if b.fused else b.module).register_forward_hook(watch(b)))
        # Gradients are wanted at the blocks' outputs only: parameters stay out of autograd, the embeddings'
        # output is made to require grad so every later activation carries a graph.
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_()))
        try:
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
        finally:
            for h in handles:
                h.remove()
            for p, flag in flags:
                p.requires_grad_(flag)
        with torch.no_grad():
            for b in blocks:
                i = b.layer_index
                calls = recorder.calls[i]
                # Backward visits the calls in reverse order of the forward.
                if len(grads[i]) != len(calls):
                    raise RuntimeError(f"{b.name}: {len(calls)} routed calls but {len(grads[i])} output gradients")
                for (hidden, index, weights), grad in zip(calls, reversed(grads[i])):
                    for e in range(b.num_experts):
                        token, slot = torch.where(index == e)
                        if not len(token):
                            continue
                        w = {k: v.float() for k, v in b.expert_weights(e).items()}
                        x, g, G = hidden[token].float(), weights[token, slot].float(), grad[token].float()
                        self.atomic[i][e] += atomic_saliency(w, b.act_fn(), x, g, G).double()
                        self.joint[i][e] += expert_saliency(w, b.act_fn(), x, g, G).double()

    def plan(self, blocks: list[MoEBlock], keep_count: int, frequencies: dict[int, torch.Tensor]) -> Plan:
        keep, details = {}, {}
        for b in blocks:
            i = b.layer_index
            atomic_sum = self.atomic[i].sum(-1)
            score = atomic_sum if self.params.aggregate == "atomic" else self.joint[i]
            keep[i] = keep_highest(score, keep_count)
            details[i] = {"saliency_atomic_sum": [float(f"{s:.6g}") for s in atomic_sum.tolist()],
                          "saliency_expert": [float(f"{s:.6g}") for s in self.joint[i].tolist()],
                          "aggregate": self.params.aggregate}
        return Plan(keep, details)
