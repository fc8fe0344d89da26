"""Block-sparse causal attention: a dense reference, two CPU paths (a gather of the chosen key blocks into one
batched attention, and PyTorch's FlexAttention with `BlockMask.from_kv_blocks`), and a speed gate.

A `BlockSelection` says, per batch row, query head and query block, which key blocks that block attends:
`kv_index[b, h, i, :kv_count[b, h, i]]` (block ids, any order; entries past the count are padding and ignored).
Query block i covers positions [i * block, (i + 1) * block). Queries are the last positions of the keys and
every query and key sequence has the same length (a prefill from an empty cache); the causal rule applies inside
the chosen blocks, so a block above the diagonal contributes nothing and the diagonal block is always needed
(`BlockSelection.with_diagonal`). No function here builds a length x length mask except `dense_reference`.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F

from sparseforge.errors import UserInputError


@dataclasses.dataclass
class BlockSelection:
    kv_index: torch.Tensor  # [batch, q_heads, q_blocks, max_count] long
    kv_count: torch.Tensor  # [batch, q_heads, q_blocks] long
    block: int
    length: int  # tokens (queries == keys)

    @property
    def q_blocks(self) -> int:
        return self.kv_index.shape[2]

    def density(self) -> float:
        """Chosen causal blocks over all causal blocks (the blocks dense causal attention computes)."""
        n = self.q_blocks
        return float(self.kv_count.sum()) / (self.kv_count[..., 0].numel() * n * (n + 1) / 2)

    def block_mask(self) -> torch.Tensor:
        """`[batch, q_heads, q_blocks, k_blocks]` bool, True where a causal block is chosen (block level only)."""
        b, h, n, m = self.kv_index.shape
        valid = torch.arange(m, device=self.kv_index.device) < self.kv_count[..., None]
        out = torch.zeros(b, h, n, n + 1, dtype=torch.bool, device=self.kv_index.device)
        idx = torch.where(valid, self.kv_index.clamp(0, n - 1), n)  # padding goes to a spare column
        out.scatter_(3, idx, True)
        causal = torch.ones(n, n, dtype=torch.bool, device=out.device).tril()
        return out[..., :n] & causal

    @classmethod
    def from_block_mask(cls, mask: torch.Tensor, block: int, length: int) -> "BlockSelection":
        """From a `[batch, heads, q_blocks, k_blocks]` bool block mask (causal part only is kept, diagonal added)."""
        n = mask.shape[2]
        mask = (mask | torch.eye(n, dtype=torch.bool, device=mask.device)) & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
        count = mask.sum(-1)
        width = max(1, int(count.max()))
        # Chosen block ids first (stable sort on "not chosen"), then padding.
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :width]
        return cls(order, count, block, length)


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def union(selections: list[BlockSelection]) -> BlockSelection:
    """The union of selections over the same heads and blocks (block level)."""
    first = selections[0]
    mask = first.block_mask()
    for s in selections[1:]:
        mask = mask | s.block_mask()
    return BlockSelection.from_block_mask(mask, first.block, first.length)


def dense_reference(q, k, v, selection: BlockSelection, scale: float | None = None) -> torch.Tensor:
    """Dense causal attention restricted to the selected blocks, in float64 (tests only: builds the full mask).
    q `[b, hq, L, d]`, k and v `[b, hkv, L, d]` -> `[b, hq, L, d]` in q's dtype."""
    b, hq, L, d = q.shape
    group = hq // k.shape[1]
    bs = selection.block
    blocks = selection.block_mask()  # [b, hq, n, n]
    pos = torch.arange(L, device=q.device)
    token = blocks[:, :, pos // bs][:, :, :, pos // bs] & (pos[None, :] <= pos[:, None])
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    scores = q.double() @ kk.transpose(-1, -2) * (scale if scale is not None else d**-0.5)
    scores = scores.masked_fill(~token, float("-inf"))
    return (scores.softmax(-1) @ vv).to(q.dtype)


def _pad_to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    L = x.shape[2]
    pad = num_blocks(L, block) * block - L
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def gather_attention(q, k, v, selection: BlockSelection, scale: float | None = None, chunk_tokens: int = 1 << 21) -> torch.Tensor:
    """Block-sparse attention by gathering each query block's chosen key blocks and running SDPA on them.

    Query blocks are processed a chunk at a time so the gathered keys and values stay near `chunk_tokens` key rows
    per head group; within a chunk every head attends `max_count` blocks (shorter lists are padded and masked).
    q `[b, hq, L, d]`, k and v `[b, hkv, L, d]`; returns `[b, hq, L, d]`."""
    b, hq, L, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    bs = selection.block
    n = num_blocks(L, bs)
    scale = scale if scale is not None else d**-0.5
    qb = _pad_to_blocks(q, bs).view(b, hq, n, bs, d)
    kb = _pad_to_blocks(k, bs).view(b, hkv, n, bs, d)
    vb = _pad_to_blocks(v, bs).view(b, hkv, n, bs, d)
    out = torch.empty(b, hq, n, bs, d, dtype=q.dtype, device=q.device)
    kv_head = torch.arange(hq, device=q.device) // group
    bi = torch.arange(b, device=q.device)[:, None, None, None]
    hi = kv_head[None, :, None, None]
    offs = torch.arange(bs, device=q.device)
    start = 0
    while start < n:
        # Chunk size: enough query blocks that the gathered keys are about chunk_tokens rows per head.
        width_here = int(selection.kv_count[:, :, start].max())
        step = max(1, min(n - start, chunk_tokens // max(1, hq * b * width_here * bs)))
        stop = start + step
        count = selection.kv_count[:, :, start:stop]  # [b, hq, c]
        width = max(1, int(count.max()))
        idx = selection.kv_index[:, :, start:stop, :width].clamp(0, n - 1)  # [b, hq, c, w]
        keys = kb[bi, hi, idx]  # [b, hq, c, w, bs, d]
        values = vb[bi, hi, idx]
        c = stop - start
        qpos = (torch.arange(start, stop, device=q.device)[:, None] * bs + offs)  # [c, bs]
        kpos = idx[..., None] * bs + offs  # [b, hq, c, w, bs]
        valid = torch.arange(width, device=q.device) < count[..., None]  # [b, hq, c, w]
        allowed = (kpos[..., None, :, :] <= qpos[None, None, :, :, None, None]) & valid[..., None, :, None]
        # allowed: [b, hq, c, bs(q), w, bs(k)]
        attn = F.scaled_dot_product_attention(
            qb[:, :, start:stop],
            keys.reshape(b, hq, c, width * bs, d),
            values.reshape(b, hq, c, width * bs, d),
            attn_mask=allowed.reshape(b, hq, c, bs, width * bs),
            scale=scale,
        )
        out[:, :, start:stop] = attn
        start = stop
    return out.view(b, hq, n * bs, d)[:, :, :L]


def _flex_block_mask(selection: BlockSelection, heads: int, device):
    from torch.nn.attention.flex_attention import BlockMask

    n = selection.q_blocks
    mask = selection.block_mask()  # [b, h, n, n] block level, never token level
    diag = torch.eye(n, dtype=torch.bool, device=mask.device)
    full = mask & ~diag
    partial = mask & diag

    def pack(m):
        count = m.sum(-1).to(torch.int32)
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return count.contiguous(), order.contiguous()

    pc, pi = pack(partial)
    fc, fi = pack(full)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(pc.to(device), pi.to(device), fc.to(device), fi.to(device),
                                    BLOCK_SIZE=selection.block, mask_mod=causal,
                                    seq_lengths=(n * selection.block, n * selection.block))


_COMPILED_FLEX = {}
# torch.compile's default (None): the first length compiles a static kernel, a second length one dynamic kernel that
# serves every later length (no recompile per prompt length, so the recompile limit - past which FlexAttention
# would silently run eager and dense - is never reached). benchmarks/attention_speed.py sets False (a static
# kernel per length, what its table measured).
FLEX_DYNAMIC: bool | None = None


def flex_attention(q, k, v, selection: BlockSelection, scale: float | None = None, compiled: bool = True) -> torch.Tensor:
    """Block-sparse attention through `torch.nn.attention.flex_attention` with a `BlockMask` built by
    `BlockMask.from_kv_blocks` from the block indices (diagonal blocks partial with the causal mask_mod, the
    others full). Compiled by default: eager FlexAttention evaluates only the mask_mod on every score and ignores
    the block lists (plain causal attention), so it is never used for sparse work."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    b, hq, L, d = q.shape
    bs = selection.block
    qp, kp, vp = (_pad_to_blocks(x, bs) for x in (q, k, v))
    mask = _flex_block_mask(selection, hq, q.device)
    fn = flex
    if compiled:
        key = (q.device.type, FLEX_DYNAMIC)
        fn = _COMPILED_FLEX.get(key)
        if fn is None:
            fn = _COMPILED_FLEX[key] = torch.compile(flex, dynamic=FLEX_DYNAMIC)
    out = fn(qp, kp, vp, block_mask=mask, scale=scale, enable_gqa=hq != k.shape[1])
    return out[:, :, :L]


def masked_attention(q, k, v, selection: BlockSelection, scale: float | None = None) -> torch.Tensor:
    """The selection as a token-level L x L mask into dense SDPA: exact, but it computes every score, so it is
    never faster than dense. For quality measurements at short lengths (the bundled model's 2048 tokens), where
    it is the quickest way to run the same attention the sparse kernels compute."""
    L = q.shape[2]
    pos = torch.arange(L, device=q.device) // selection.block
    blocks = selection.block_mask()
    allowed = blocks[:, :, pos][:, :, :, pos] & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


KERNELS = {"gather": gather_attention, "flex": flex_attention, "masked": masked_attention}


def block_sparse_attention(q, k, v, selection: BlockSelection, scale: float | None = None, kernel: str = "gather") -> torch.Tensor:
    if kernel not in KERNELS:
        raise UserInputError(f"unknown block-sparse attention kernel '{kernel}'; choose one of {', '.join(KERNELS)}")
    if q.shape[2] != k.shape[2] or q.shape[2] != selection.length:
        raise ValueError("block-sparse attention needs queries and keys of the selection's length (a prefill)")
    if kernel == "flex" and _FLEX_BROKEN.get(q.device.type):
        kernel = "gather"
    try:
        return KERNELS[kernel](q, k, v, selection, scale)
    except Exception as exc:  # noqa: BLE001 - torch.compile failures come in many types (no C++ compiler, Triton)
        if kernel != "flex":
            raise
        # FlexAttention must be compiled to skip blocks; where compiling fails the gather computes the same.
        _FLEX_BROKEN[q.device.type] = True
        warnings.warn(f"FlexAttention could not be compiled on {q.device.type} ({type(exc).__name__}); using the gather kernel")
        return gather_attention(q, k, v, selection, scale)


_FLEX_BROKEN: dict[str, bool] = {}


# ----------------------------------------------------------------------------- speed gate

# Sequence length from which the sparse path beats dense SDPA, per (device, kernel) and density, measured by
# benchmarks/attention_speed.py (benchmarks/results/attention_speed.json: Llama-3-8B attention shapes, index
# building included, one thread). FlexAttention won at every benchmarked length from 1024 tokens (the shortest
# measured) at densities up to 0.3; the gather kernel lost to SDPA at 1K, 4K and 8K, so its table is empty (the
# gate always says dense for it), as is the masked one (never faster) and every device not measured yet.
# Between measured densities the next larger one's crossover is used; above the largest the gate says dense.
CROSSOVER: dict[tuple[str, str], dict[float, int]] = {
    ("cpu", "flex"): {0.1: 1024, 0.2: 1024, 0.3: 1024},
    ("cpu", "gather"): {},
    ("cpu", "masked"): {},
}


def crossover_table(device: str, kernel: str) -> dict[float, int]:
    return dict(CROSSOVER.get((device, kernel), {}))


@dataclasses.dataclass
class AttentionGate:
    """Chooses sparse or dense per (sequence length, density). `min_tokens` short-circuits: below it the gate says
    dense without building any index. `crossover` maps density -> first length where sparse wins."""

    crossover: dict[float, int] = dataclasses.field(default_factory=lambda: crossover_table("cpu", "flex"))

    def min_tokens(self) -> int:
        return min(self.crossover.values()) if self.crossover else 1 << 62

    def sparse_wins(self, length: int, density: float) -> bool:
        if length < self.min_tokens():
            return False
        above = sorted(d for d in self.crossover if d >= density)
        if not above:
            return False
        return length >= self.crossover[above[0]]

    def to_json(self) -> dict:
        return {str(k): v for k, v in sorted(self.crossover.items())}

    @classmethod
    def from_json(cls, data: dict) -> "AttentionGate":
        return cls({float(k): int(v) for k, v in data.items()})


def attention_flops(length: int, q_heads: int, head_dim: int, density: float = 1.0) -> float:
    """Multiply-adds x 2 of causal attention (QK^T and PV) at `density` of the causal blocks."""
    return 4.0 * q_heads * head_dim * length * (length + 1) / 2 * density


__all__ = ["BlockSelection", "AttentionGate", "block_sparse_attention", "dense_reference", "gather_attention",
           "flex_attention", "masked_attention", "union", "num_blocks", "attention_flops", "CROSSOVER", "crossover_table", "KERNELS"]
