"""OWL (Yin et al., 2024): non-uniform layer-wise sparsity. Layers whose Wanda scores |w|·||x|| hold more
outliers (entries above `outlier_threshold` times the layer's mean score) keep more weights. The outlier
ratios are rescaled to a spread of 2·`spread` around the target and shifted so the mean layer sparsity is the
target; then any base pruner runs with its layer's sparsity.
"""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.core.calibration import CalibrationConfig, calibration_batches, matrices, run_layerwise
from sparseforge.errors import UserInputError
from sparseforge.methods.base import Method, get_method, param, register, registered
from sparseforge.methods.weights.base import StageResult, WeightPruner

# A base pruner is any registered weight pruner that prunes on its own: one that wraps another (DSnoT) is not.
base_pruners = registered(lambda cls: issubclass(cls, WeightPruner) and "base" not in {f.name for f in dataclasses.fields(cls.Params)})


@dataclasses.dataclass
class OWLParams:
    base: str = param("wanda", "pruner that applies the per-layer sparsities", base_pruners)
    sparsity: float = param(0.7, "mean sparsity over decoder layers, in [0, 1)")
    outlier_threshold: float = param(5.0, "an entry is an outlier above this multiple of its layer's mean score (M)")
    spread: float = param(0.08, "layer sparsities lie within target ± spread (lambda)")


def outlier_ratios(model, tokenizer, targets, ignore, calibration: CalibrationConfig, threshold: float, progress=True) -> dict[int, float]:
    """Per decoder layer: fraction of Wanda scores above `threshold` x the layer's mean score."""
    ratios: dict[int, float] = {}

    def measure(index, layer, projections, stats):
        # A fused expert stack counts as its E matrices, each scored with its own expert's input norms.
        scores = torch.cat([(w.float().abs() * s.col_norm.to(w.device)).flatten()
                            for n, p in projections.items() for _, w, s in matrices(p.weight(), stats[n])])
        ratios[index] = (scores > threshold * scores.mean()).float().mean().item()

    cal = dataclasses.replace(calibration, propagate="dense")
    run_layerwise(model, measure, targets, ignore, calibration_batches(tokenizer, cal), ("col_norm",), cal, progress, desc="owl")
    return ratios


def allocate(ratios: dict[int, float], sparsity: float, spread: float) -> dict[int, float]:
    """Layer sparsities with mean `sparsity`: more outliers, lower sparsity, over a range of 2 x spread."""
    values = torch.tensor([ratios[i] for i in sorted(ratios)], dtype=torch.float64)
    span = values.max() - values.min()
    keep = torch.zeros_like(values) if span == 0 else (values - values.min()) / span * 2 * spread
    keep = keep - keep.mean() + (1 - sparsity)
    out = {i: float(1 - k) for i, k in zip(sorted(ratios), keep)}
    if any(not 0 <= s < 1 for s in out.values()):
        raise UserInputError(f"OWL spread {spread} around sparsity {sparsity} leaves [0, 1); lower 'spread'")
    return out


@register
class OWL(Method):
    name = "owl"
    family = "weights"
    summary = "non-uniform per-layer sparsity from each layer's outlier ratio, applied by a base pruner"
    Params = OWLParams

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        if not 0 <= params.sparsity < 1:
            raise UserInputError(f"{where}sparsity {params.sparsity} is outside [0, 1); use a fraction such as 0.7")
        if params.spread < 0 or params.outlier_threshold <= 0:
            raise UserInputError(f"{where}spread must be >= 0 and outlier_threshold > 0 (e.g. 0.08 and 5)")

    def apply(self, model, tokenizer=None, targets=("*",), ignore=(), calibration: CalibrationConfig | None = None, progress=True) -> StageResult:
        calibration = calibration or CalibrationConfig()
        ratios = outlier_ratios(model, tokenizer, targets, ignore, calibration, self.params.outlier_threshold, progress)
        base_cls = get_method(self.params.base)
        base = base_cls(base_cls.parse_params({"sparsity": self.params.sparsity}))
        base.layer_sparsity = allocate(ratios, self.params.sparsity, self.params.spread)
        result = base.apply(model, tokenizer, targets, ignore, calibration, progress)
        return dataclasses.replace(result, method=f"owl+{base_cls.name}")
