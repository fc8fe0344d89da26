"""DSnoT (Zhang et al., 2024): training-free prune-and-grow repair of a pruned layer. For each output row i,
the expected output error e_i = Σ_j (W_ij − Ŵ_ij)·E[x_j] is driven towards zero by swaps that keep the
row's number of weights: revive the pruned weight that cuts |e_i| most, and remove the kept weight of
least Wanda importance |w|·||x|| among those whose removal also moves e_i towards zero (any kept weight
if none does). A swap is kept only if |e_i| shrinks; a row stops when it no longer does, after
`max_cycles` swaps, or once |e_i| falls below `tolerance` times its starting value.

Swaps stay within a row, so per-row counts (unstructured with compare=row, or any per-row budget) are
preserved exactly; N:M bases are not supported (a swap could break a group).
"""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.core.masks import Pattern
from sparseforge.errors import UserInputError
from sparseforge.methods.base import get_method, param, register
from sparseforge.methods.weights.base import WeightPruner


@dataclasses.dataclass
class DSnoTParams:
    base: str = param("wanda", "pruner whose mask is repaired", ("magnitude", "wanda", "sparsegpt"))
    sparsity: float = param(0.6, "fraction of weights removed by the base pruner, in [0, 1)")
    max_cycles: int = param(50, "most prune-and-grow swaps per row")
    tolerance: float = param(0.1, "stop a row once |error| is below this fraction of its starting value")


def dsnot_repair(dense: torch.Tensor, pruned: torch.Tensor, col_mean: torch.Tensor, col_norm: torch.Tensor,
                 max_cycles: int = 50, tolerance: float = 0.1) -> torch.Tensor:
    """Swap weights within each row of `pruned` ([out, in]) to shrink the expected output error."""
    W = dense.float()
    current = pruned.float().clone()  # kept weights keep their values (SparseGPT may have updated them)
    kept = current != 0
    mu = col_mean.float().to(W.device).reshape(1, -1)
    revive_gain = W * mu  # reviving a pruned weight at its dense value lowers the row error by this
    importance = W.abs() * col_norm.float().to(W.device).reshape(1, -1)
    error = (W * mu).sum(1) - (current * mu).sum(1)
    start = error.abs()
    active = start > 0
    rows = torch.arange(W.shape[0], device=W.device)
    for _ in range(max_cycles):
        if not active.any():
            break
        sign = torch.sign(error).reshape(-1, 1)
        # Grow: the pruned weight whose revival lowers the error most (same sign as the error).
        gain = torch.where(~kept, revive_gain * sign, torch.full_like(W, -torch.inf))
        grow = gain.argmax(1)
        after_grow = error - revive_gain[rows, grow]
        # Prune: the least important kept weight whose removal moves the error towards zero, if any.
        removal = current * mu  # removing a kept weight raises the row error by this
        toward = (removal * torch.sign(after_grow).reshape(-1, 1)) < 0
        candidates = kept & toward
        candidates = torch.where(candidates.any(1, keepdim=True), candidates, kept)
        drop = torch.where(candidates, importance, torch.full_like(W, torch.inf)).argmin(1)
        new_error = after_grow + removal[rows, drop]
        accept = active & (new_error.abs() < error.abs()) & torch.isfinite(gain[rows, grow]) & (grow != drop)
        if not accept.any():
            break
        r, g, d = rows[accept], grow[accept], drop[accept]
        kept[r, g] = True
        current[r, g] = W[r, g]
        kept[r, d] = False
        current[r, d] = 0.0
        error = torch.where(accept, new_error, error)
        active = accept & (error.abs() > tolerance * start)
    return current.to(dense.dtype)


@register
class DSnoT(WeightPruner):
    name = "dsnot"
    summary = "prune with a base method, then repair each row's mask by error-reducing prune-and-grow swaps"
    Params = DSnoTParams
    needs_stats = ("col_norm",)  # plus the base method's own, set per instance in __init__
    comparison_group = "row"

    def __init__(self, params=None):
        super().__init__(params)
        base_cls = get_method(self.params.base)
        self.base = base_cls(base_cls.parse_params({"sparsity": self.params.sparsity} | ({"compare": "row"} if base_cls.name == "magnitude" else {})))
        self.needs_stats = tuple(dict.fromkeys(("col_norm", *base_cls.needs_stats)))

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        if not 0 <= params.sparsity < 1:
            raise UserInputError(f"{where}sparsity {params.sparsity} is outside [0, 1); use a fraction such as 0.6")
        if params.max_cycles < 0 or not 0 <= params.tolerance < 1:
            raise UserInputError(f"{where}max_cycles must be >= 0 and tolerance in [0, 1), e.g. 50 and 0.1")

    @property
    def pattern(self) -> Pattern:
        return Pattern("unstructured", self.params.sparsity)

    def prune_weight(self, weight, stats, pattern):
        if weight.dim() != 2:
            raise UserInputError("dsnot repairs 2-D weights only; ignore fused expert weights ('*experts*')")
        pruned = self.base.prune_weight(weight, stats, pattern)
        # Revived weights take their dense values: DSnoT does not update weights, only the mask.
        return dsnot_repair(weight, pruned, stats.col_mean, stats.col_norm, self.params.max_cycles, self.params.tolerance)
