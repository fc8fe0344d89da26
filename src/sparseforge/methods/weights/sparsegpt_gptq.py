"""Joint SparseGPT + GPTQ (the SparseGPT paper's joint mode): one OBS pass whose every column is first pruned
(SparseGPT's selection, unstructured or N:M) and then rounded (GPTQ's quantizer), so the error of both steps
is compensated together. Pruned weights are exactly zero after rounding (every grid contains 0)."""
from __future__ import annotations

import dataclasses

from sparseforge.core.masks import Pattern
from sparseforge.core.obs import obs_solve
from sparseforge.errors import UserInputError
from sparseforge.methods.base import param, register
from sparseforge.methods.weights.gptq import check_solver_params
from sparseforge.methods.weights.quant_base import QuantParams, WeightQuantizer


@dataclasses.dataclass
class SparseGPTGPTQParams(QuantParams):
    sparsity: float | None = param(None, "fraction of weights removed, in [0, 1); default 0.5 (implied by an N:M pattern)")
    pattern: str = param("unstructured", "'unstructured' or 'N:M' (keep N of every M consecutive input weights), e.g. '2:4'")
    blocksize: int = param(128, "columns pruned and quantized together before their error reaches the rest")
    dampening: float = param(0.01, "fraction of the mean Hessian diagonal added to the diagonal for stability")


@register
class SparseGPTGPTQ(WeightQuantizer):
    name = "sparsegpt-gptq"
    summary = "prune (unstructured or N:M) and quantize in one OBS pass (SparseGPT's joint mode)"
    Params = SparseGPTGPTQParams
    needs_stats = ("hessian",)

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        super().validate(params, where)
        check_solver_params(params, where)
        try:
            pattern = Pattern.parse(params.pattern, params.sparsity)
        except UserInputError as exc:
            raise UserInputError(f"{where}{exc}") from None
        if pattern.kind == "nm" and params.group_size % pattern.m:
            raise UserInputError(f"{where}group_size {params.group_size} is not a multiple of M={pattern.m}; e.g. group_size 128")

    @property
    def pattern(self) -> Pattern:
        return Pattern.parse(self.params.pattern, self.params.sparsity)

    @property
    def pattern_name(self) -> str:
        return str(self.pattern)

    def quantize_projection(self, weight, stats):
        p = self.params
        return obs_solve(weight, stats.hessian, prune=self.pattern, quant=self.scheme, blocksize=p.blocksize, dampening=p.dampening)
