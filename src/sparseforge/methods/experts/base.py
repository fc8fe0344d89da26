"""Expert-level methods: remove or merge whole routed experts of every MoE block, so the result is a smaller
model with fewer experts (router rows and the config's expert count updated) that plain transformers loads.

A method here implements two things: `collect` (what it measures on the calibration text, batch by batch,
while a `core.moe.RoutingRecorder` counts which experts the routers pick) and `plan` (which experts each block
keeps, in order, and any new weights for them). Choosing the count, calibrating, the surgery
(`core.moe.keep_experts`) and the report are shared. transformers' configs hold one expert count for every
layer, so every MoE block keeps the same number; which ones is decided per block. Shared (always-on) experts
such as Qwen2-MoE's `shared_expert` are never touched.

Statistics come from the unmodified model (one pass over the calibration batches), as in the frequency, HEAPr
and MC-SMoE papers: each block's decision does not depend on what the others remove.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from sparseforge.core.calibration import CalibrationConfig, calibration_batches
from sparseforge.core.masks import prune_count
from sparseforge.core.moe import MoEBlock, RoutingRecorder, find_moe_blocks, keep_experts
from sparseforge.core.offload import offload_store
from sparseforge.errors import UserInputError
from sparseforge.methods.base import Method


@dataclasses.dataclass
class ExpertResult:
    """What an expert stage did: experts per block before and after, and per MoE layer (original numbering) the
    kept experts in their new order, the removed ones, each expert's share of the routed calibration tokens, and
    the method's own per-expert fields (scores, merge groups)."""

    method: str
    pattern: str  # e.g. "experts-25%"; no ':' (artifact storage reads 'N:M' patterns from it)
    projections: list[str]  # the parameters that changed shape, by module name
    experts_before: int
    experts_after: int
    params_before: int
    params_after: int
    calibration_tokens: int
    layers: dict[int, dict[str, Any]]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Plan:
    """Per MoE layer: the experts kept, in order, and the method's report fields."""

    keep: dict[int, list[int]]
    details: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)


class ExpertMethod(Method):
    """Base of the expert family. Subclasses set `Params` (with a `ratio` field: the fraction of each block's
    routed experts that goes) and implement `plan`; those that need more than routing counts override
    `collect` (and set `keep_calls` when they need the routed tokens themselves)."""

    family: ClassVar[str] = "experts"
    keep_calls: ClassVar[bool] = False
    contract_architecture: ClassVar[str] = "mixtral"  # tests/test_method_contract.py runs expert methods on an MoE model

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        if not 0 < params.ratio < 1:
            raise UserInputError(f"{where}ratio {params.ratio:g} is outside (0, 1); it is the fraction of each MoE block's routed experts removed, e.g. 0.25")

    @classmethod
    def example_params(cls) -> dict[str, Any]:
        return {"ratio": 0.5}

    # -- what a method implements ---------------------------------------------------------------------------------
    def start(self, model, blocks: list[MoEBlock]) -> None:
        """Called once before the calibration batches run (set up accumulators)."""

    def collect(self, model, blocks: list[MoEBlock], ids: torch.Tensor, recorder: RoutingRecorder) -> None:
        """Run one calibration batch `ids [1, S]` through `model` with `recorder` active. Default: a plain
        inference forward (the recorder's counts are all frequency pruning needs)."""
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    def plan(self, blocks: list[MoEBlock], keep_count: int, frequencies: dict[int, torch.Tensor]) -> Plan:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------------------------
    def apply(self, model, tokenizer=None, targets=("*",), ignore=(), calibration: CalibrationConfig | None = None, progress=True) -> ExpertResult:
        if list(targets) != ["*"] or list(ignore):
            raise UserInputError(f"an {self.name} stage acts on every MoE block alike (the config holds one expert count); drop its 'targets' and 'ignore'")
        if offload_store(model) is not None:
            raise UserInputError(f"{self.name} runs the whole model on the calibration text and cannot run on a disk-offloaded model; load it without offload")
        blocks = find_moe_blocks(model)
        if not blocks:
            raise UserInputError(f"{type(model).__name__} has no mixture-of-experts block (a router beside fused or listed experts); "
                                 f"{self.name} needs an MoE model such as Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE")
        counts = {b.num_experts for b in blocks}
        if len(counts) != 1:
            raise UserInputError(f"{self.name} needs the same number of experts in every MoE block, found {sorted(counts)}")
        n = counts.pop()
        top_k = max(b.top_k for b in blocks)
        removed = prune_count(n, self.params.ratio)
        keep_count = n - removed
        if removed == 0:
            raise UserInputError(f"ratio {self.params.ratio:g} removes no expert of {n}; raise it to at least {1 / n:.3g}")
        if keep_count < top_k:
            raise UserInputError(f"ratio {self.params.ratio:g} keeps {keep_count} of {n} experts, fewer than the {top_k} each token is routed to; "
                                 f"use a ratio of at most {(n - top_k) / n:.3g}")
        if tokenizer is None:
            raise UserInputError(f"{self.name} measures routing on calibration text and needs the model's tokenizer; pass one")
        calibration = calibration or CalibrationConfig()
        batches = calibration_batches(tokenizer, calibration)
        device = model.get_input_embeddings().weight.device
        params_before = sum(p.numel() for p in model.parameters())

        was_training = model.training
        model.eval()
        self.start(model, blocks)
        try:
            with RoutingRecorder(blocks, keep_calls=self.keep_calls) as recorder:
                for ids in batches:
                    self.collect(model, blocks, ids.to(device), recorder)
                    for calls in recorder.calls.values():
                        calls.clear()  # each batch is consumed by `collect`; keep memory to one batch
        finally:
            model.train(was_training)
        frequencies = recorder.frequencies()
        plan = self.plan(blocks, keep_count, frequencies)
        keep_experts(model, plan.keep)

        layers = {}
        for b in blocks:
            i = b.layer_index
            kept = plan.keep[i]
            layers[i] = {"kept": kept, "removed": sorted(set(range(n)) - set(kept)),
                         "frequency": [round(float(f), 6) for f in frequencies[i]],
                         "tokens": [int(c) for c in recorder.counts[i]], **plan.details.get(i, {})}
        changed = [name for b in blocks for name in (b.experts_name, b.router_name)]
        return ExpertResult(self.name, f"experts-{round(100 * removed / n)}%", changed, n, keep_count, params_before,
                            sum(p.numel() for p in model.parameters()), sum(int(ids.numel()) for ids in batches), layers)


def keep_highest(scores: torch.Tensor, keep_count: int) -> list[int]:
    """The `keep_count` highest-scoring experts, in their original order; ties go to the lower index, so the
    choice is deterministic."""
    order = sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e))
    return sorted(order[:keep_count])
