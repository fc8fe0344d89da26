"""Expert merging in the way of MC-SMoE's M-SMoE (Li et al., ICLR 2024, "Merge, Then Compress"), per MoE block:

1. Routing similarity: each expert's column of router logits over the calibration tokens; experts are compared
   by the cosine of those columns (experts the router scores alike are interchangeable to it).
2. Dominant experts: the `keep` most often routed experts; every other expert joins the dominant expert it is
   most similar to.
3. Alignment: intermediate neurons are interchangeable inside an expert, so before averaging, each member's
   neurons are permuted to match the dominant expert's: neuron features are the concatenated gate row, up row
   and down column; the permutation maximising the summed feature inner products is a linear assignment
   (scipy's `linear_sum_assignment` when scipy is installed, else a greedy best-pair-first match, reported).
   Permuting neurons leaves an expert's function unchanged.
4. Merge: the aligned weights of a group are averaged, weighted by each member's routing frequency.
5. One expert per group stays, in the dominant expert's place; the router keeps the dominant expert's row.

MC-SMoE then compresses the merged experts (low rank + sparsity); here that is left to the weight methods a
recipe can run afterwards (e.g. wanda), which compose with this stage.
"""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.core.moe import MoEBlock, RoutingRecorder
from sparseforge.errors import UserInputError
from sparseforge.methods.base import param, register
from sparseforge.methods.experts.base import ExpertMethod, Plan, keep_highest


@dataclasses.dataclass
class MergeExpertsParams:
    ratio: float = param(0.5, "fraction of each MoE block's routed experts merged away, in (0, 1); at least top_k must stay")
    align: bool = param(True, "permute each member's neurons to the dominant expert's before averaging (MC-SMoE); false: average as stored")


def _assignment_solver():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # scipy is optional: a greedy match is close on well-separated neurons, exact on permuted copies
        return None
    return linear_sum_assignment


def match_neurons(similarity: torch.Tensor) -> tuple[torch.Tensor, str]:
    """perm with perm[i] = the member neuron matched to dominant neuron i, maximising sum_i similarity[i, perm[i]].
    Returns (perm, solver name)."""
    solve = _assignment_solver()
    if solve is not None:
        rows, cols = solve(similarity.double().numpy(), maximize=True)
        perm = torch.empty(len(rows), dtype=torch.long)
        perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
        return perm, "scipy.linear_sum_assignment"
    n = similarity.shape[0]
    perm = torch.full((n,), -1, dtype=torch.long)
    order = torch.argsort(similarity.flatten(), descending=True, stable=True)
    used_rows, used_cols = set(), set()
    for flat in order.tolist():
        r, c = divmod(flat, n)
        if r not in used_rows and c not in used_cols:
            perm[r] = c
            used_rows.add(r)
            used_cols.add(c)
            if len(used_rows) == n:
                break
    return perm, "greedy"


def _features(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """One row per intermediate neuron: its gate row, up row and down column, concatenated ([I, 3H])."""
    return torch.cat([w["gate"], w["up"], w["down"].T], dim=1)


def merge_group(weights: list[dict[str, torch.Tensor]], freq: list[float], align: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Frequency-weighted average of a group's experts (dominant first), each member's neurons aligned to the
    dominant's first. Returns the merged {gate, up, down} and the solvers used."""
    total = sum(freq)
    coef = [f / total for f in freq] if total > 0 else [1 / len(freq)] * len(freq)  # never-routed group: plain mean
    dominant = weights[0]
    merged = {k: coef[0] * v for k, v in dominant.items()}
    solvers = []
    for w, c in zip(weights[1:], coef[1:]):
        if align:
            perm, solver = match_neurons(_features(dominant) @ _features(w).T)
            w = {"gate": w["gate"][perm], "up": w["up"][perm], "down": w["down"][:, perm]}
            solvers.append(solver)
        for k in merged:
            merged[k] = merged[k] + c * w[k]
    return merged, solvers


def _has_expert_bias(block: MoEBlock) -> bool:
    if block.fused:
        return any(isinstance(getattr(block.experts, n, None), torch.Tensor) for n in ("gate_up_proj_bias", "down_proj_bias"))
    return any(getattr(m, "bias", None) is not None for m in block.experts[0].modules() if isinstance(m, torch.nn.Linear))


@register
class MergeExperts(ExpertMethod):
    name = "merge-experts"
    summary = "MC-SMoE merging: group experts by router-logit similarity, align neurons, average by routing frequency; one expert per group stays"
    Params = MergeExpertsParams
    keep_calls = True

    def start(self, model, blocks: list[MoEBlock]) -> None:
        biased = [b.name for b in blocks if _has_expert_bias(b)]
        if biased:
            raise UserInputError(f"merge-experts averages expert weight matrices and does not merge expert biases, which {biased[0]} has; "
                                 "use expert-prune or heapr for this model")
        # Gram matrix of the router-logit columns, accumulated over tokens: cosine similarity needs nothing else.
        self.gram = {b.layer_index: torch.zeros(b.num_experts, b.num_experts, dtype=torch.float64) for b in blocks}

    def collect(self, model, blocks: list[MoEBlock], ids: torch.Tensor, recorder: RoutingRecorder) -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
            for b in blocks:
                for hidden, _, _ in recorder.calls[b.layer_index]:
                    logits = torch.nn.functional.linear(hidden.float(), b.router.weight.float(),
                                                        None if getattr(b.router, "bias", None) is None else b.router.bias.float())
                    self.gram[b.layer_index] += (logits.T @ logits).double().cpu()

    def plan(self, blocks: list[MoEBlock], keep_count: int, frequencies: dict[int, torch.Tensor]) -> Plan:
        keep, details = {}, {}
        merged_weights = {}
        for b in blocks:
            i = b.layer_index
            freq = frequencies[i]
            gram = self.gram[i]
            norm = gram.diagonal().clamp_min(1e-30).sqrt()
            similarity = gram / norm[:, None] / norm[None, :]
            dominant = keep_highest(freq, keep_count)
            groups = {d: [d] for d in dominant}
            for e in range(b.num_experts):
                if e not in groups:
                    # Ties go to the lower-numbered dominant expert (deterministic).
                    best = max(dominant, key=lambda d: (float(similarity[e, d]), -d))
                    groups[best].append(e)
            solvers = set()
            for d, members in groups.items():
                if len(members) > 1:
                    ws = [{k: v.detach().float().clone() for k, v in b.expert_weights(m).items()} for m in members]
                    merged_weights[(i, d)], used = merge_group(ws, [float(freq[m]) for m in members], self.params.align)
                    solvers.update(used)
            keep[i] = dominant
            details[i] = {"groups": {str(d): members for d, members in groups.items()},
                          "similarity": [[round(float(s), 4) for s in row] for row in similarity],
                          "alignment": sorted(solvers) if self.params.align else "none"}
        # Written only after every group is computed, into the dominant experts' own storage (fused or listed);
        # keep_experts then drops the rest.
        with torch.no_grad():
            for (i, d), merged in merged_weights.items():
                block = next(b for b in blocks if b.layer_index == i)
                for role, view in block.expert_weights(d).items():
                    view.copy_(merged[role].to(view.dtype))
        return Plan(keep, details)
