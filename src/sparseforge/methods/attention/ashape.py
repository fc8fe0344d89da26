"""A-shape (StreamingLLM's pattern as prefill sparsity, MInference's "A-shape" heads): every query block attends
the first `sinks` tokens' blocks and the blocks of its last `window` tokens. Static: no index estimation."""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.kernels.block_sparse_attention import BlockSelection, num_blocks
from sparseforge.methods.attention.base import PrefillParams, SparsePrefill, check_int, prefix
from sparseforge.methods.base import param, register


@dataclasses.dataclass
class AShapeParams(PrefillParams):
    sinks: int = param(64, "first tokens every query attends (rounded up to whole blocks)")
    window: int = param(4096, "most recent tokens each query attends, its own block included (rounded up to whole blocks)")


def ashape_selection(batch: int, heads: int, length: int, block: int, sinks: int, window: int, device) -> BlockSelection:
    n = num_blocks(length, block)
    sink_blocks = min(n, num_blocks(sinks, block)) if sinks > 0 else 0
    window_blocks = max(1, num_blocks(window, block))
    width = min(n, sink_blocks + window_blocks)
    i = torch.arange(n, device=device)[:, None]
    # Local blocks i - window_blocks + 1 .. i, then the sink blocks that lie before the local band.
    local = i - torch.arange(window_blocks - 1, -1, -1, device=device)[None, :]
    sink = torch.arange(sink_blocks, device=device)[None, :].expand(n, -1)
    sink_ok = sink < (i - window_blocks + 1)
    local_ok = local >= 0
    cand = torch.cat([sink, local], 1)
    ok = torch.cat([sink_ok, local_ok], 1)
    order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)[:, :width]
    index = cand.gather(1, order).clamp(min=0)
    count = ok.sum(1)
    return BlockSelection(index.expand(batch, heads, n, width).contiguous(), count.expand(batch, heads, n).contiguous(), block, length)


def ashape_density(length: int, block: int, sinks: int, window: int) -> float:
    """The density of `ashape_selection`, in closed form (no index): query block i attends min(i + 1, window
    blocks) local blocks and the sink blocks that lie before its band."""
    n = num_blocks(length, block)
    sink_blocks = min(n, num_blocks(sinks, block)) if sinks > 0 else 0
    window_blocks = max(1, num_blocks(window, block))
    i = torch.arange(n, dtype=torch.float64)
    local = torch.clamp(i + 1, max=window_blocks)
    sink = torch.clamp(i - window_blocks + 1, min=0, max=sink_blocks)
    return float((local + sink).sum()) / (n * (n + 1) / 2)


@register
class AShape(SparsePrefill):
    name = "ashape"
    summary = "prefill attends attention sinks plus a local window of blocks (A-shape, static)"
    Params = AShapeParams

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        super().validate(params, where)
        check_int(params.sinks, prefix(where), "sinks", minimum=0)
        check_int(params.window, prefix(where), "window", minimum=1)

    @classmethod
    def example_params(cls) -> dict:
        return {"block_size": 8, "sinks": 4, "window": 8, "gate": "always", "kernel": "gather"}

    def select(self, q, k, scale, heads, index):
        p = self.params
        return ashape_selection(q.shape[0], len(heads), q.shape[2], p.block_size, p.sinks, p.window, q.device)

    def predicted_density(self, q, k, scale, heads, index):
        p = self.params  # static pattern: the prediction is exact
        return torch.full((len(heads),), ashape_density(q.shape[2], p.block_size, p.sinks, p.window), dtype=torch.float64)
