"""Expert pruning by routing frequency: in every MoE block, remove the `ratio` of routed experts that the router
picked least often on the calibration text (counting every (token, top-k slot) pair), with their router rows.
The cheapest expert-level baseline (one inference pass, no weights read); see docs/methods/experts.md."""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.core.moe import MoEBlock
from sparseforge.methods.base import param, register
from sparseforge.methods.experts.base import ExpertMethod, Plan, keep_highest


@dataclasses.dataclass
class ExpertPruneParams:
    ratio: float = param(0.25, "fraction of each MoE block's routed experts removed (the least routed), in (0, 1); at least top_k must stay")


@register
class ExpertPrune(ExpertMethod):
    name = "expert-prune"
    summary = "remove the least-routed experts of every MoE block (calibration routing counts): fewer experts, smaller checkpoint"
    Params = ExpertPruneParams

    def plan(self, blocks: list[MoEBlock], keep_count: int, frequencies: dict[int, torch.Tensor]) -> Plan:
        return Plan({b.layer_index: keep_highest(frequencies[b.layer_index], keep_count) for b in blocks})
