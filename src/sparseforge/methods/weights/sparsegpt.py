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

from sparseforge.core.masks import Pattern, prune_count
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
        if weight.dim() != 2:
            raise UserInputError("sparsegpt prunes 2-D weights only; ignore fused expert weights ('*experts*')")
        return sparsegpt_prune(weight, stats.hessian, pattern, self.params.blocksize, self.params.dampening)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, blocksize: int = 128, dampening: float = 0.01) -> torch.Tensor:
    """Return the pruned copy of `weight` ([out, in], any float dtype; computed in float32)."""
    # A contiguous copy: GPT-2's Conv1D hands over a transposed view, whose strides clone() would keep, and
    # the flat mask indexing below needs row-major blocks.
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    rows, cols = W.shape
    if pattern.kind == "nm":
        if cols % pattern.m:
            raise UserInputError(f"input dimension {cols} is not a multiple of M={pattern.m}; ignore this layer or pick another M")
        if blocksize % pattern.m:
            blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)  # N:M groups must not straddle blocks
    H = hessian.detach().clone().float().to(W.device)
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do nothing
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += dampening * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
    # Upper Cholesky factor of H⁻¹: row j holds what the OBS update needs after column j is fixed.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    target_total = prune_count(rows * cols, pattern.sparsity)
    pruned_total = 0
    for b1 in range(0, cols, blocksize):
        b2 = min(b1 + blocksize, cols)
        W1 = W[:, b1:b2].clone()
        Hinv1 = Hinv[b1:b2, b1:b2]
        Err1 = torch.zeros_like(W1)
        prune = torch.zeros_like(W1, dtype=torch.bool)
        if pattern.kind == "unstructured":
            # Exact count for this slab such that the running total tracks floor(sparsity * numel so far).
            k = prune_count(rows * b2, pattern.sparsity) - pruned_total if b2 < cols else target_total - pruned_total
            if k > 0:
                scores = (W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2).flatten()
                order = torch.argsort(scores, stable=True)
                prune.view(-1)[order[:k]] = True
            pruned_total += max(k, 0)
        for i in range(b2 - b1):
            if pattern.kind == "nm" and i % pattern.m == 0:
                group = W1[:, i : i + pattern.m] ** 2 / torch.diag(Hinv1)[i : i + pattern.m].reshape(1, -1) ** 2
                order = torch.argsort(group, dim=1, stable=True)
                prune[:, i : i + pattern.m].scatter_(1, order[:, : pattern.m - pattern.n], True)
            w = W1[:, i]
            d = Hinv1[i, i]
            q = torch.where(prune[:, i], torch.zeros_like(w), w)
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q  # exactly zero where pruned, whatever rounding the update left
            Err1[:, i] = err
        W[:, b1:b2] = W1
        W[:, b2:] -= Err1 @ Hinv[b1:b2, b2:]
    return W.to(weight.dtype)
