"""Magnitude pruning: drop the weights of smallest |w|. No calibration data; the baseline to beat."""
from __future__ import annotations

import dataclasses

from sparseforge.methods.base import param, register
from sparseforge.methods.weights.base import PruningParams, WeightPruner


@dataclasses.dataclass
class MagnitudeParams(PruningParams):
    compare: str = param("matrix", "comparison group for unstructured pruning: 'row' (per output) or 'matrix'", ("row", "matrix"))


@register
class Magnitude(WeightPruner):
    name = "magnitude"
    summary = "drop the smallest |w| (unstructured per matrix by default, or N:M); needs no calibration data"
    Params = MagnitudeParams

    def score(self, weight, stats):
        return weight.abs()
