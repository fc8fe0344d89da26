"""Wanda (Sun et al., 2023): score |w_ij| * ||x_j||_2, with x_j the j-th input feature over the calibration
tokens; compared within each output row; no weight update."""
from __future__ import annotations

from sparseforge.methods.base import register
from sparseforge.methods.weights.base import WeightPruner


@register
class Wanda(WeightPruner):
    name = "wanda"
    summary = "drop the smallest |w| * ||x||_2 per output row (or N:M) from one calibration pass; no weight update"
    needs_stats = ("col_norm",)

    def score(self, weight, stats):
        return weight.abs() * stats.col_norm.to(weight.device)
