"""SpQR-style quantization (Dettmers et al., 2023, simplified): GPTQ with small groups, and in each group the
weights far from the group's mean (more than `outlier_threshold` standard deviations) kept in float as
outliers, outside the group's min-max range, so a few large weights do not coarsen the grid of the rest.
Outliers are stored as a sparse list (index + float32 value) beside the packed codes. Not implemented from the
paper: its second-level quantization of the scales (scales stay float32) and its Hessian-based outlier
criterion (here: distance from the group mean)."""
from __future__ import annotations

import dataclasses

from sparseforge.core.obs import obs_solve
from sparseforge.errors import UserInputError
from sparseforge.methods.base import param, register
from sparseforge.methods.weights.gptq import check_solver_params
from sparseforge.methods.weights.quant_base import QuantParams, WeightQuantizer


@dataclasses.dataclass
class SpQRParams(QuantParams):
    bits: int = param(3, "bits per weight code: 2, 3, 4 or 8")
    group_size: int = param(16, "input columns sharing one scale and zero point (SpQR uses small groups, e.g. 16)")
    outlier_threshold: float = param(3.0, "a weight further than this many standard deviations from its group's mean is an outlier, kept in float")
    blocksize: int = param(128, "columns quantized together before their error reaches the rest (rounded to whole groups)")
    dampening: float = param(0.01, "fraction of the mean Hessian diagonal added to the diagonal for stability")


@register
class SpQR(WeightQuantizer):
    name = "spqr"
    summary = "GPTQ with small groups and outlier weights kept in float as a sparse list (SpQR-style)"
    Params = SpQRParams
    needs_stats = ("hessian",)

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        super().validate(params, where)
        check_solver_params(params, where)
        if not params.outlier_threshold > 0:
            raise UserInputError(f"{where}outlier_threshold {params.outlier_threshold} must be positive, e.g. 3.0")
        if params.group_size == 0:
            raise UserInputError(f"{where}spqr needs groups (group_size > 0, e.g. 16): outliers are found per group")

    def quantize_projection(self, weight, stats):
        p = self.params
        return obs_solve(weight, stats.hessian, quant=self.scheme, blocksize=p.blocksize, dampening=p.dampening, outlier_threshold=p.outlier_threshold)

    def report_quant(self) -> dict:
        return super().report_quant() | {"outlier_threshold": self.params.outlier_threshold}
