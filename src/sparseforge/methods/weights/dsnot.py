"""DSnoT (Zhang et al., 2024): training-free prune-and-grow repair of a pruned layer.

For output row i let e_i = sum_j (W_ij - What_ij) * E[x_j], the expected output error the mask introduces.
Each cycle makes one swap per row that keeps the row's weight count:
  * grow: the pruned weight with the largest sign(e_i) * W_ij * E[x_j] / Var[x_j]^variance_power, i.e. the
    revival that cuts the error most, preferring inputs whose variance is small (where the mean is a reliable
    stand-in for the input, the paper's variance term);
  * prune: among kept weights whose W_ij * E[x_j] has the opposite sign of e_i (removing them also moves e_i
    toward zero), the one of least Wanda importance |W_ij| * ||x_j||.
A row stops when a swap would not shrink |e_i| (the reference code accepts any swap while |e_i| is above a
threshold; we keep only improving swaps so the repair never increases the error it targets), after
`max_cycles` swaps, or once |e_i| < tolerance * (its starting value).

Like the reference implementation's default, only attention projections are repaired (`repair: attention`);
its authors found repairing the MLP projections hurts. Swaps stay within a row, so per-row counts
(unstructured with compare=row) are preserved exactly; N:M bases are not supported (a swap could break a group).
"""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.core.adapter import ATTENTION_HINTS
from sparseforge.core.masks import Pattern
from sparseforge.errors import UserInputError
from sparseforge.methods.base import get_method, param, register
from sparseforge.methods.weights.base import WeightPruner
from sparseforge.methods.weights.owl import base_pruners


@dataclasses.dataclass
class DSnoTParams:
    base: str = param("wanda", "pruner whose mask is repaired", base_pruners)
    sparsity: float = param(0.6, "fraction of weights removed by the base pruner, in [0, 1)")
    max_cycles: int = param(50, "most prune-and-grow swaps per row")
    tolerance: float = param(0.1, "stop a row once |error| is below this fraction of its starting value")
    variance_power: float = param(1.0, "growth score divides by Var[x_j] to this power (0: mean-only criterion)")
    repair: str = param("attention", "which projections get the repair; the others keep the base mask", ("attention", "mlp", "all"))


def dsnot_repair(dense: torch.Tensor, pruned: torch.Tensor, col_mean: torch.Tensor, col_norm: torch.Tensor,
                 max_cycles: int = 50, tolerance: float = 0.1, col_var: torch.Tensor | None = None,
                 variance_power: float = 1.0) -> torch.Tensor:
    """Swap weights within each row of `pruned` ([out, in]) to shrink the expected output error."""
    W = dense.float()
    current = pruned.float().clone()  # kept weights keep their values (SparseGPT may have updated them)
    kept = current != 0
    mu = col_mean.float().to(W.device).reshape(1, -1)
    contribution = W * mu  # reviving weight j lowers e by this; removing it raises e by current * mu
    if col_var is not None and variance_power:
        # Floor the variance so constant inputs do not dominate through a division by ~0.
        var = col_var.float().to(W.device).reshape(1, -1)
        var = var.clamp_min(1e-6 * float(var.mean()) + 1e-12)
        grow_score = contribution / var.pow(variance_power)
    else:
        grow_score = contribution
    importance = W.abs() * col_norm.float().to(W.device).reshape(1, -1)
    error = contribution.sum(1) - (current * mu).sum(1)
    start = error.abs()
    active = start > 0
    rows = torch.arange(W.shape[0], device=W.device)
    neg_inf = torch.tensor(-torch.inf, device=W.device)
    pos_inf = torch.tensor(torch.inf, device=W.device)
    for _ in range(max_cycles):
        if not active.any():
            break
        sign = torch.sign(error).reshape(-1, 1)
        gain = torch.where(~kept, grow_score * sign, neg_inf)
        grow = gain.argmax(1)
        removal = current * mu
        candidates = kept & (removal * sign < 0)
        drop = torch.where(candidates, importance, pos_inf).argmin(1)
        has_drop = candidates.any(1)
        new_error = error - contribution[rows, grow] + removal[rows, drop]
        accept = active & has_drop & (gain[rows, grow] > 0) & (new_error.abs() < error.abs())
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

    def prune_projection(self, name, weight, stats, pattern):
        if not _repairs(self.params.repair, name):
            return self.base.prune_weight(weight, stats, pattern)
        return self.prune_weight(weight, stats, pattern)

    def prune_weight(self, weight, stats, pattern):
        pruned = self.base.prune_weight(weight, stats, pattern)
        # Revived weights take their dense values: DSnoT does not update weights, only the mask.
        return dsnot_repair(weight, pruned, stats.col_mean, stats.col_norm, self.params.max_cycles, self.params.tolerance,
                            stats.col_var, self.params.variance_power)


def _repairs(which: str, projection_name: str) -> bool:
    """Whether a projection is in scope: attention projections are found by the adapter's module-name hints."""
    if which == "all":
        return True
    in_attention = any(part in ATTENTION_HINTS for part in projection_name.split("."))
    return in_attention if which == "attention" else not in_attention
