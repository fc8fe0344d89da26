"""GPTQ (Frantar et al., 2022): quantize columns left to right, spreading each column's rounding error over the
columns not yet quantized with the inverse Hessian of the layer input (the OBS solver SparseGPT uses, with its
rounding step instead of its selection step; core/obs.py)."""
from __future__ import annotations

import dataclasses

from sparseforge.core.obs import obs_solve
from sparseforge.errors import UserInputError
from sparseforge.methods.base import param, register
from sparseforge.methods.weights.quant_base import QuantParams, WeightQuantizer


@dataclasses.dataclass
class GPTQParams(QuantParams):
    act_order: bool = param(False, "visit columns by decreasing Hessian diagonal (groups keep their columns: static groups)")
    blocksize: int = param(128, "columns quantized together before their error reaches the rest (rounded to whole groups)")
    dampening: float = param(0.01, "fraction of the mean Hessian diagonal added to the diagonal for stability")


def check_solver_params(params, where: str) -> None:
    if params.blocksize < 1:
        raise UserInputError(f"{where}blocksize {params.blocksize} must be a positive integer, e.g. 128")
    if not 0 <= params.dampening < 1:
        raise UserInputError(f"{where}dampening {params.dampening} must be in [0, 1), e.g. 0.01")


@register
class GPTQ(WeightQuantizer):
    name = "gptq"
    summary = "quantize column by column with inverse-Hessian error feedback (2/3/4/8 bits, groups, act-order)"
    Params = GPTQParams
    needs_stats = ("hessian",)

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        super().validate(params, where)
        check_solver_params(params, where)

    def quantize_projection(self, weight, stats):
        p = self.params
        return obs_solve(weight, stats.hessian, quant=self.scheme, blocksize=p.blocksize, dampening=p.dampening, act_order=p.act_order)

    def report_quant(self) -> dict:
        return super().report_quant() | {"act_order": self.params.act_order}
