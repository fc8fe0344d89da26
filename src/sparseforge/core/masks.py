"""Sparsity patterns: selection of which weights to keep from a score, and validators that check a weight
satisfies a pattern exactly. All functions work on `[..., out, in]` tensors (a stack of matrices is fine).

Patterns: unstructured (per row or per matrix), N:M, b x b blocks, whole channels (input columns or output
rows) and whole attention heads (with grouped-query attention, the same number inside every KV group).

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
    return drop_lowest(flat, prune_count(flat.shape[-1], sparsity)).reshape(scores.shape)


def drop_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over the last dimension without its `k` lowest scores (equal scores: earlier positions go first)."""
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    # Selection in linear time (kthvalue) instead of a full sort; equal scores at the threshold are pruned
    # in position order, which is exactly what a stable sort would choose.
    values = scores.float()
    threshold = values.kthvalue(k, dim=-1, keepdim=True).values
    below = values < threshold
    ties = values == threshold
    ties_to_prune = k - below.sum(-1, keepdim=True)
    return ~(below | (ties & (ties.cumsum(-1) <= ties_to_prune)))


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


# --- structured patterns: blocks, channels, heads ----------------------------------------------------------


def _check_fraction(sparsity: float, what: str) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise UserInputError(f"{what} {sparsity!r} is outside [0, 1); use a fraction such as 0.25")


def _blocks(t: torch.Tensor, b: int) -> torch.Tensor:
    """View `[..., out, in]` as `[..., out/b, b, in/b, b]`, or raise when b x b blocks do not tile it."""
    out_f, in_f = t.shape[-2:]
    if b < 1 or out_f % b or in_f % b:
        raise UserInputError(
            f"a {out_f}x{in_f} weight cannot be tiled by {b}x{b} blocks; pick a block size that divides both dimensions"
        )
    return t.reshape(*t.shape[:-2], out_f // b, b, in_f // b, b)


def block_mask(scores: torch.Tensor, sparsity: float, b: int) -> torch.Tensor:
    """Keep-mask removing the `prune_count(blocks, sparsity)` b x b blocks of lowest summed score in each matrix."""
    _check_fraction(sparsity, "block sparsity")
    summed = _blocks(scores.float(), b).sum(dim=(-3, -1))  # [..., out/b, in/b]
    keep = drop_lowest(summed.flatten(-2), prune_count(summed.shape[-2] * summed.shape[-1], sparsity))
    keep = keep.reshape(summed.shape)[..., :, None, :, None]
    return keep.expand(*summed.shape[:-2], summed.shape[-2], b, summed.shape[-1], b).reshape(scores.shape)


def check_blocks(weight: torch.Tensor, sparsity: float, b: int) -> bool:
    """True when each matrix has at least `prune_count(blocks, sparsity)` all-zero b x b blocks."""
    out_f, in_f = weight.shape[-2:]
    if b < 1 or out_f % b or in_f % b:
        return False
    zero_blocks = (_blocks(weight, b) == 0).all(dim=-1).all(dim=-2)  # [..., out/b, in/b]
    need = prune_count(zero_blocks.shape[-2] * zero_blocks.shape[-1], sparsity)
    return bool((zero_blocks.flatten(-2).sum(-1) >= need).all())


def channel_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask over channels (`scores` is `[..., channels]`) removing the `prune_count(channels, sparsity)`
    lowest. A channel is a whole input column or output row of a weight; `channel_weight_mask` expands it."""
    _check_fraction(sparsity, "channel sparsity")
    return drop_lowest(scores, prune_count(scores.shape[-1], sparsity))


def channel_weight_mask(keep: torch.Tensor, shape: torch.Size | tuple, dim: str = "in") -> torch.Tensor:
    """Expand a channel keep-mask to a `[..., out, in]` weight: dim="in" masks columns, dim="out" rows."""
    if dim not in ("in", "out"):
        raise ValueError(f"unknown channel dimension {dim!r}")
    keep = keep[..., None, :] if dim == "in" else keep[..., :, None]
    return keep.expand(shape)


def check_channels(weight: torch.Tensor, sparsity: float, dim: str = "in") -> bool:
    """True when at least `prune_count(channels, sparsity)` whole input columns (dim="in") or output rows
    (dim="out") of each matrix are zero."""
    if dim not in ("in", "out"):
        raise ValueError(f"unknown channel dimension {dim!r}")
    zero = (weight == 0).all(dim=-2 if dim == "in" else -1)
    return bool((zero.sum(-1) >= prune_count(zero.shape[-1], sparsity)).all())


@dataclasses.dataclass(frozen=True)
class HeadPlan:
    """How many attention heads a head sparsity removes. With grouped-query attention (`kv_heads` < `heads`,
    query head h reads KV head h // group) the same number of query heads goes from every KV group, so the
    groups stay equal; when a group is too small for that (always in plain multi-head attention, where a
    group is one head), whole groups go instead, their KV heads with them."""

    heads: int
    kv_heads: int
    per_group: int  # query heads removed inside every group (KV heads all stay)
    groups: int  # whole KV groups removed (used when per_group is 0)

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @property
    def heads_after(self) -> int:
        return self.heads - self.per_group * self.kv_heads - self.groups * self.group_size

    @property
    def kv_heads_after(self) -> int:
        return self.kv_heads - self.groups

    @property
    def mode(self) -> str:
        return "per_group" if self.per_group else "whole_groups"

    @staticmethod
    def make(heads: int, kv_heads: int | None, sparsity: float) -> "HeadPlan":
        _check_fraction(sparsity, "head sparsity")
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads:
            raise UserInputError(f"{heads} attention heads do not split into {kv_heads} KV groups; check the model config")
        per_group = prune_count(heads // kv_heads, sparsity)
        groups = 0 if per_group else prune_count(kv_heads, sparsity)
        plan = HeadPlan(heads, kv_heads, per_group, groups)
        if sparsity > 0 and plan.heads_after == heads:
            smallest = 1 / max(heads // kv_heads, kv_heads)  # one head per group, or one whole group
            raise UserInputError(
                f"head sparsity {sparsity:g} removes no head: {heads} query heads in {kv_heads} KV groups of "
                f"{heads // kv_heads} need at least {smallest:g}; raise it or set it to 0"
            )
        return plan


def head_mask(scores: torch.Tensor, plan: HeadPlan) -> torch.Tensor:
    """Keep-mask over query heads (`scores` is `[..., heads]`) following `plan`: the lowest `per_group` heads of
    every KV group, or the `groups` KV groups of lowest summed score."""
    if scores.shape[-1] != plan.heads:
        raise ValueError(f"scores cover {scores.shape[-1]} heads, the plan {plan.heads}")
    grouped = scores.reshape(*scores.shape[:-1], plan.kv_heads, plan.group_size)
    if plan.per_group:
        keep = drop_lowest(grouped, plan.per_group)
    else:
        keep = drop_lowest(grouped.float().sum(-1), plan.groups)[..., None].expand(grouped.shape)
    return keep.reshape(scores.shape)


def check_heads(weight: torch.Tensor, plan: HeadPlan) -> bool:
    """True when the input columns of `weight` (an attention output projection, `[..., out, heads*head_dim]`)
    are zero for whole heads as `plan` requires: `per_group` heads in every KV group, or `groups` whole groups."""
    if weight.shape[-1] % plan.heads:
        return False
    zero = (weight.reshape(*weight.shape[:-1], plan.heads, -1) == 0).all(-1).all(-2)  # [..., heads]
    zero = zero.reshape(*zero.shape[:-1], plan.kv_heads, plan.group_size)
    if plan.per_group:
        return bool((zero.sum(-1) >= plan.per_group).all())
    return bool((zero.all(-1).sum(-1) >= plan.groups).all())
