"""SparseGPT (Frantar and Alistarh, 2023): prune columns left to right and, after each column, spread the
pruning error over the columns not yet visited, using the inverse Hessian H = XᵀX (+ damping) of the layer
input. Blocked: masks are chosen per block of `blocksize` columns and the error of a whole block reaches the
remaining columns in one matrix product (the "lazy batch" update).

Comparison group for unstructured sparsity: the slab of all rows × one block of columns, scored by
w² / [H⁻¹]_jj², with per-slab counts rounded so that the whole matrix has exactly floor(sparsity · numel)
zeros. N:M: within each group of M columns, per row.
"""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.core.masks import Pattern
from sparseforge.core.obs import obs_solve
from sparseforge.errors import UserInputError
from sparseforge.methods.base import param, register
from sparseforge.methods.weights.base import WeightPruner


@dataclasses.dataclass
class SparseGPTParams:
    sparsity: float | None = param(None, "fraction of weights removed, in [0, 1); default 0.5 (implied by an N:M pattern)")
    pattern: str = param("unstructured", "'unstructured' or 'N:M' (keep N of every M consecutive input weights), e.g. '2:4'")
    blocksize: int = param(128, "columns pruned together before their error is propagated to the rest")
    dampening: float = param(0.01, "fraction of the mean Hessian diagonal added to the diagonal for stability")


@register
class SparseGPT(WeightPruner):
    name = "sparsegpt"
    summary = "prune column by column with inverse-Hessian updates of the remaining weights (unstructured or N:M)"
    Params = SparseGPTParams
    needs_stats = ("hessian",)
    comparison_group = "block"

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        super().validate(params, where)
        if params.blocksize < 1:
            raise UserInputError(f"{where}blocksize {params.blocksize} must be a positive integer, e.g. 128")
        if not 0 <= params.dampening < 1:
            raise UserInputError(f"{where}dampening {params.dampening} must be in [0, 1), e.g. 0.01")

    def prune_weight(self, weight: torch.Tensor, stats, pattern: Pattern) -> torch.Tensor:
        return sparsegpt_prune(weight, stats.hessian, pattern, self.params.blocksize, self.params.dampening)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, blocksize: int = 128, dampening: float = 0.01) -> torch.Tensor:
    """Return the pruned copy of `weight` ([out, in], any float dtype; computed in float32): the shared OBS
    solver (core/obs.py) with its selection step only."""
    return obs_solve(weight, hessian, prune=pattern, blocksize=blocksize, dampening=dampening).weight.to(weight.dtype)
