"""Weight pruning family. A pruner implements only `score(weight, stats)`: higher scores are kept. Mask
selection by pattern (unstructured per row or per matrix, N:M) and the layer-by-layer walk are shared.

A fused MoE expert stack `[E, out, in]` is pruned as E matrices, each against its own expert's statistics
(core.calibration.matrices), so every pruner works on experts unchanged and each expert slice satisfies the
pattern exactly."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from sparseforge.core.calibration import CalibrationConfig, InputStats, calibration_batches, matrices, run_layerwise
from sparseforge.core.masks import Pattern, select_mask
from sparseforge.methods.base import Method, param


@dataclasses.dataclass
class PruningParams:
    sparsity: float | None = param(None, "fraction of weights removed, in [0, 1); default 0.5 (implied by an N:M pattern)")
    pattern: str = param("unstructured", "'unstructured' or 'N:M' (keep N of every M consecutive input weights), e.g. '2:4'")
    compare: str = param("row", "comparison group for unstructured pruning: 'row' (per output) or 'matrix'", ("row", "matrix"))


@dataclasses.dataclass
class StageResult:
    """What a stage did: per projection, the pattern it now satisfies and its comparison group."""

    method: str
    pattern: str
    compare: str
    projections: list[str]
    layer_sparsity: dict[int, float] | None = None  # per decoder layer, when not uniform (OWL)
    # MoE calibration: tokens routed to each expert and the experts that fell back (core.calibration.run_layerwise)
    routing: dict | None = None

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        if out["routing"] is None:  # dense models' reports stay as they were
            del out["routing"]
        return out


class WeightPruner(Method):
    family: ClassVar[str] = "weights"
    Params: ClassVar[type] = PruningParams
    needs_stats: ClassVar[tuple[str, ...]] = ()  # "col_norm", "hessian"
    comparison_group: ClassVar[str] = "row"  # reported when Params has no `compare` field

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        try:
            Pattern.parse(params.pattern, params.sparsity)
        except Exception as exc:
            raise type(exc)(f"{where}{exc}") from None

    # Per-decoder-layer sparsity overriding the uniform one (set by OWL; unstructured patterns only).
    layer_sparsity: dict[int, float] | None = None

    @property
    def pattern(self) -> Pattern:
        return Pattern.parse(self.params.pattern, self.params.sparsity)

    def pattern_for(self, layer_index: int) -> Pattern:
        if self.layer_sparsity is None:
            return self.pattern
        return Pattern("unstructured", self.layer_sparsity[layer_index])

    @property
    def compare(self) -> str:
        return getattr(self.params, "compare", self.comparison_group)

    def score(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        raise NotImplementedError

    def prune_weight(self, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern) -> torch.Tensor:
        """Return the pruned `[..., out, in]` weight. Methods that update surviving weights override this."""
        mask = select_mask(self.score(weight, stats), pattern, self.compare)
        return weight * mask

    def prune_projection(self, name: str, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern) -> torch.Tensor:
        """Prune the projection called `name`; methods that treat projections differently by role override this."""
        return self.prune_weight(weight, stats, pattern)

    def apply(self, model, tokenizer=None, targets=("*",), ignore=(), calibration: CalibrationConfig | None = None, progress=True) -> StageResult:
        calibration = calibration or CalibrationConfig()
        batches = calibration_batches(tokenizer, calibration) if self.needs_stats else None
        pruned: list[str] = []

        def prune_layer(index, layer, projections, stats):
            for name, proj in projections.items():
                w = proj.weight()
                if w.dim() == 2:
                    proj.set_weight(self.prune_projection(name, w.float(), stats.get(name), self.pattern_for(index)).to(w.dtype))
                else:  # an expert stack: expert by expert, in place, so each sees the others' weights as they are
                    for e, we, se in matrices(w, stats.get(name)):
                        we.copy_(self.prune_projection(name, we.float(), se, self.pattern_for(index)).to(w.dtype))
                pruned.append(name)

        routing = run_layerwise(model, prune_layer, targets, ignore, batches, self.needs_stats, calibration, progress, desc=self.name)
        return StageResult(self.name, str(self.pattern), self.compare, pruned, self.layer_sparsity, routing)
