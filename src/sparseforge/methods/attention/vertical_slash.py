"""Vertical-slash (MInference): the attention of the prompt's last queries to every key, summed per key
(vertical lines: key positions every query looks at) and per diagonal (slash lines: fixed distances back), picks
the top `vertical` key blocks and the top `slash` block diagonals of each head; every query block attends those.

Selection is at block granularity (the shared block-sparse kernel's unit): a chosen key block is a column of
blocks, a chosen block diagonal d gives query block i the key block i - d. MInference itself keeps token-level
lines inside its CUDA kernel; the block version covers a superset of each chosen line's tokens."""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.kernels.block_sparse_attention import BlockSelection, num_blocks
from sparseforge.methods.attention.base import (PrefillParams, SparsePrefill, block_density, check_int, last_query_probs,
                                                pooled_query_columns, prefix)
from sparseforge.methods.base import param, register


@dataclasses.dataclass
class VerticalSlashParams(PrefillParams):
    last_queries: int = param(64, "prompt's last queries whose attention estimates the lines")
    vertical: int = param(1024, "tokens of vertical lines kept per head (top key blocks by estimated attention; the first block always)")
    slash: int = param(2048, "tokens of slash lines kept per head (top block diagonals; the main diagonal always)")


def line_scores(probs: torch.Tensor, block: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From `[b, h, w, L]` probabilities of the last w queries: per key block the summed attention `[b, h, n]`
    and per block diagonal (distance back in blocks) the summed attention `[b, h, n]`."""
    b, h, w, L = probs.shape
    n = num_blocks(L, block)
    pad = n * block - L
    col = torch.nn.functional.pad(probs.sum(2), (0, pad)).view(b, h, n, block).sum(-1)
    qpos = torch.arange(L - w, L, device=probs.device)
    kpos = torch.arange(L, device=probs.device)
    # Block distance of each (query, key) pair, as the kernel will see it.
    dist = (qpos[:, None] // block - kpos[None, :] // block).clamp(min=0)  # [w, L]
    diag = torch.zeros(b, h, n, dtype=probs.dtype, device=probs.device)
    diag.scatter_add_(2, dist.flatten().expand(b, h, -1), probs.reshape(b, h, -1))
    return col, diag


def lines_mask(columns: torch.Tensor, diagonals: torch.Tensor) -> torch.Tensor:
    """Columns `[b, h, n]` and diagonals `[b, h, n]` (bool) -> their `[b, h, n, n]` block mask."""
    n = columns.shape[-1]
    i = torch.arange(n, device=columns.device)
    mask = columns[:, :, None, :].expand(-1, -1, n, -1).clone()
    j = i[:, None] - i[None, :]  # distance of key block j from query block i
    mask |= diagonals.gather(2, j.clamp(min=0).flatten().expand(*columns.shape[:2], -1)).view(*columns.shape[:2], n, n) & (j >= 0)
    return mask


def lines_to_selection(columns: torch.Tensor, diagonals: torch.Tensor, length: int, block: int) -> BlockSelection:
    """Columns `[b, h, n]` and diagonals `[b, h, n]` (bool) -> the selection of their causal blocks."""
    return BlockSelection.from_block_mask(lines_mask(columns, diagonals), block, length)


def top_lines(col: torch.Tensor, diag: torch.Tensor, nv: int, ns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top `nv` key blocks and `ns` block diagonals by score (`[b, h, n]` each), the first of each always."""
    col, diag = col.clone(), diag.clone()
    col[..., 0] = float("inf")  # sinks
    diag[..., 0] = float("inf")  # the local diagonal
    columns = torch.zeros_like(col, dtype=torch.bool).scatter_(2, col.topk(nv, -1).indices, True)
    diagonals = torch.zeros_like(diag, dtype=torch.bool).scatter_(2, diag.topk(ns, -1).indices, True)
    return columns, diagonals


@register
class VerticalSlash(SparsePrefill):
    name = "vertical-slash"
    summary = "prefill keeps per head the top vertical (key) and slash (diagonal) block lines of the last queries' attention (MInference)"
    Params = VerticalSlashParams

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        super().validate(params, where)
        for name in ("last_queries", "vertical", "slash"):
            check_int(getattr(params, name), prefix(where), name)

    @classmethod
    def example_params(cls) -> dict:
        return {"block_size": 8, "last_queries": 8, "vertical": 8, "slash": 8, "gate": "always", "kernel": "gather"}

    def select(self, q, k, scale, heads, index):
        p = self.params
        L, bs = q.shape[2], p.block_size
        n = num_blocks(L, bs)
        col, diag = line_scores(last_query_probs(q, k, scale, heads, p.last_queries), bs, L)
        columns, diagonals = top_lines(col, diag, min(n, num_blocks(p.vertical, bs)), min(n, num_blocks(p.slash, bs)))
        return lines_to_selection(columns, diagonals, L, bs)

    def predicted_density(self, q, k, scale, heads, index):
        p = self.params
        L, bs = q.shape[2], p.block_size
        n = num_blocks(L, bs)
        nv, ns = min(n, num_blocks(p.vertical, bs)), min(n, num_blocks(p.slash, bs))
        if nv >= n or ns >= n:  # every key block or every diagonal: all causal blocks, exactly
            return torch.ones(len(heads), dtype=torch.float64)
        # The same line choice from one pooled query per head (1 / last_queries of the index's cost). That query
        # stands at the end, so a key block j lies n - 1 - j diagonals back.
        col = pooled_query_columns(q, k, scale, heads, p.last_queries, bs)
        columns, diagonals = top_lines(col, col.flip(-1), nv, ns)
        return block_density(lines_mask(columns, diagonals)).mean(0)
