"""Sparsity patterns: selection of which weights to keep from a score, and validators that check a weight
satisfies a pattern exactly. All functions work on `[..., out, in]` tensors (a stack of matrices is fine).

Ties are broken by position (a stable sort), so the same scores give the same mask bit for bit.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from sparseforge.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class Pattern:
    """`unstructured` at a sparsity, or `N:M` (keep N of every M consecutive input weights)."""

    kind: str  # "unstructured" or "nm"
    sparsity: float
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else f"unstructured@{self.sparsity:g}"

    @staticmethod
    def parse(pattern: str, sparsity: float | None) -> "Pattern":
        """Build a pattern from recipe fields. `pattern` is "unstructured" or "N:M"; an N:M pattern fixes the
        sparsity at 1 - N/M, and a conflicting explicit sparsity is an error."""
        if pattern == "unstructured":
            s = 0.5 if sparsity is None else sparsity
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0.0 <= s < 1.0:
                raise UserInputError(f"sparsity {s!r} is outside [0, 1); use a fraction such as 0.5")
            return Pattern("unstructured", float(s))
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
        if not match:
            raise UserInputError(f"pattern {pattern!r} is not understood; use 'unstructured' or 'N:M' such as '2:4'")
        n, m = int(match.group(1)), int(match.group(2))
        if m < 1 or n < 1 or n >= m:
            raise UserInputError(f"pattern {n}:{m} needs 1 <= N < M (keep N of every M weights); use e.g. 2:4 or 4:8")
        implied = 1.0 - n / m
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise UserInputError(
                f"sparsity {sparsity} conflicts with pattern {n}:{m}, which means {implied:g}; drop one of the two"
            )
        return Pattern("nm", implied, n, m)


def prune_count(group_size: int, sparsity: float) -> int:
    """floor(sparsity * group_size), robust to binary rounding (0.7 * 4800 is 3359.9999... in floats)."""
    return int(group_size * sparsity + 1e-9)


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    """Keep-mask removing the `prune_count(group_size, sparsity)` lowest-scoring weights of each group.

    group="row": compare within each output row (Wanda's choice: every output keeps the same fan-in).
    group="matrix": compare across the whole matrix (classic magnitude pruning).
    """
    if group not in ("row", "matrix"):
        raise ValueError(f"unknown comparison group {group!r}")
    flat = scores if group == "row" else scores.reshape(*scores.shape[:-2], 1, -1)
    n_prune = prune_count(flat.shape[-1], sparsity)
    if n_prune == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    # Selection in linear time (kthvalue) instead of a full sort; equal scores at the threshold are pruned
    # in position order, which is exactly what a stable sort would choose.
    values = flat.float()
    threshold = values.kthvalue(n_prune, dim=-1, keepdim=True).values
    below = values < threshold
    ties = values == threshold
    ties_to_prune = n_prune - below.sum(-1, keepdim=True)
    prune = below | (ties & (ties.cumsum(-1) <= ties_to_prune))
    return (~prune).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the `n` highest scores of every `m` consecutive weights along the input dimension."""
    if scores.shape[-1] % m:
        raise UserInputError(
            f"input dimension {scores.shape[-1]} is not a multiple of M={m}, so {n}:{m} cannot tile it; "
            "ignore this layer in the recipe or pick an M that divides it"
        )
    groups = scores.reshape(*scores.shape[:-1], -1, m).float()
    order = torch.argsort(groups, dim=-1, stable=True, descending=True)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order[..., :n], True)
    return mask.reshape(scores.shape)


def select_mask(scores: torch.Tensor, pattern: Pattern, group: str = "row") -> torch.Tensor:
    if pattern.kind == "nm":
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, pattern.sparsity, group)


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of `m` consecutive input weights has at most `n` nonzeros."""
    if weight.shape[-1] % m:
        return False
    nonzero = (weight != 0).reshape(*weight.shape[:-1], -1, m).sum(-1)
    return bool((nonzero <= n).all())


def check_unstructured(weight: torch.Tensor, sparsity: float, group: str = "row") -> bool:
    """True when each comparison group has at least `prune_count(group_size, sparsity)` zeros."""
    flat = weight if group == "row" else weight.reshape(*weight.shape[:-2], 1, -1)
    need = prune_count(flat.shape[-1], sparsity)
    return bool(((flat == 0).sum(-1) >= need).all())


def check_pattern(weight: torch.Tensor, pattern: Pattern, group: str = "row") -> bool:
    if pattern.kind == "nm":
        return check_nm(weight, pattern.n, pattern.m)
    return check_unstructured(weight, pattern.sparsity, group)
