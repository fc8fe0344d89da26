"""FlexPrefill: per head, a divergence test picks between a query-aware block pattern and a fixed vertical-slash
pattern, and blocks (or lines) are added in order of estimated attention until they hold `gamma` of it.

Per head: `true` is the last query block's real attention pooled to key blocks; `estimate` is the softmax of the
pooled (block-mean) last queries against the pooled keys. Where their Jensen-Shannon divergence is below `tau`,
the pooled estimate is trusted for every query block (query-aware: each query block takes its top key blocks
until their estimated mass reaches `gamma`); elsewhere the head takes vertical and slash lines from the last
queries' attention until each kind covers `gamma` of that attention (fixed pattern)."""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.kernels.block_sparse_attention import BlockSelection, num_blocks
from sparseforge.methods.attention.base import (PrefillParams, SparsePrefill, block_density, check_fraction, check_int,
                                                kv_heads_of, last_query_probs, pooled, prefix)
from sparseforge.methods.attention.vertical_slash import line_scores, lines_mask, lines_to_selection
from sparseforge.methods.base import param, register


@dataclasses.dataclass
class FlexPrefillParams(PrefillParams):
    gamma: float = param(0.95, "share of the estimated attention mass the chosen blocks (or lines) must hold")
    tau: float = param(0.1, "Jensen-Shannon divergence below which a head trusts the pooled query-aware estimate")
    min_blocks: int = param(1, "key blocks each query block keeps at least (query-aware heads)")


def cumulative_mask(probs: torch.Tensor, gamma: float, minimum: int = 1) -> torch.Tensor:
    """Bool mask of the smallest top set of `probs` (last dim, each row summing to 1) reaching `gamma`."""
    values, order = probs.sort(-1, descending=True)
    before = values.cumsum(-1) - values  # mass of the entries ranked above
    keep = (before < gamma) & (values > 0)
    keep[..., :minimum] = True
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log()), torch.zeros_like(a)).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def pooled_block_probs(q, k, scale, heads, block: int) -> torch.Tensor:
    """Softmax of block-mean queries against block-mean keys, causal at block level: `[b, h, n, n]`."""
    kvh = kv_heads_of(heads, q.shape[1], k.shape[1])
    if len(heads) == q.shape[1] and bool((heads == torch.arange(q.shape[1], device=heads.device)).all()):
        qp, kp = pooled(q, block), pooled(k, block)[:, kvh]  # every head: one pass, no copy of q
    else:  # a subset (the search's heads of this pattern): pool only those query heads and their KV heads
        qp = torch.cat([pooled(q[:, h:h + 1], block) for h in heads.tolist()], 1)
        used = torch.unique(kvh)
        kp = torch.cat([pooled(k[:, g:g + 1], block) for g in used.tolist()], 1)[:, torch.searchsorted(used, kvh)]
    s = qp @ kp.transpose(-1, -2) * scale
    n = s.shape[-1]
    above = torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1)
    return s.masked_fill(above, float("-inf")).softmax(-1)


@register
class FlexPrefill(SparsePrefill):
    name = "flexprefill"
    summary = "prefill blocks added per head until they hold gamma of the estimated attention; a divergence test picks query-aware or vertical-slash (FlexPrefill)"
    Params = FlexPrefillParams

    def __init__(self, params=None):
        super().__init__(params)
        self.query_aware: dict[int, list[bool]] = {}  # per layer, per head of the last prefill

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        super().validate(params, where)
        check_fraction(params.gamma, prefix(where), "gamma")
        if isinstance(params.tau, bool) or not isinstance(params.tau, (int, float)) or params.tau < 0:
            from sparseforge.errors import UserInputError

            raise UserInputError(f"{prefix(where)}tau must be a number >= 0, got {params.tau!r}")
        check_int(params.min_blocks, prefix(where), "min_blocks")

    @classmethod
    def example_params(cls) -> dict:
        return {"block_size": 8, "gamma": 0.9, "gate": "always", "kernel": "gather"}

    def head_choice(self, q, k, scale, heads, estimate=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(query-aware per head `[b, h]` bool, the last block's real attention `[b, h, w, L]`); `estimate` is
        `pooled_block_probs` when the caller has it."""
        bs = self.params.block_size
        L = q.shape[2]
        w = L - (num_blocks(L, bs) - 1) * bs  # the last (possibly short) query block
        probs = last_query_probs(q, k, scale, heads, w)
        n = num_blocks(L, bs)
        true = torch.nn.functional.pad(probs.mean(2), (0, n * bs - L)).view(*probs.shape[:2], n, bs).sum(-1)
        if estimate is None:
            estimate = pooled_block_probs(q, k, scale, heads, bs)
        return js_divergence(true, estimate[:, :, -1]) < self.params.tau, probs

    def predicted_density(self, q, k, scale, heads, index):
        # Both patterns from the pooled estimate alone (the index's cost is the last block's real attention):
        # query-aware blocks as select builds them; the fixed lines with the estimate's last row standing in for
        # the last block's attention (every query of that block lies n - 1 - j diagonals from key block j). The
        # prediction per head is the sparser of the two, so the gate goes dense only when both would be dense.
        p = self.params
        est = pooled_block_probs(q, k, scale, heads, p.block_size)
        aware = block_density(cumulative_mask(est, p.gamma, p.min_blocks))
        col = est[:, :, -1]
        columns = cumulative_mask(col, p.gamma)
        diagonals = cumulative_mask(col.flip(-1), p.gamma)
        columns[..., 0] = diagonals[..., 0] = True
        fixed = block_density(lines_mask(columns, diagonals))
        return torch.minimum(aware, fixed).mean(0)

    def select(self, q, k, scale, heads, index):
        p = self.params
        L, bs = q.shape[2], p.block_size
        est = pooled_block_probs(q, k, scale, heads, bs)  # [b, h, n, n]
        aware, probs = self.head_choice(q, k, scale, heads, est)
        self.query_aware[index] = aware[0].tolist()
        blocks = cumulative_mask(est, p.gamma, p.min_blocks)
        col, diag = line_scores(probs, bs, L)
        columns = cumulative_mask(col / col.sum(-1, keepdim=True), p.gamma)
        diagonals = cumulative_mask(diag / diag.sum(-1, keepdim=True), p.gamma)
        columns[..., 0] = diagonals[..., 0] = True  # the sink column and the local diagonal, always
        fixed = lines_to_selection(columns, diagonals, L, bs).block_mask()
        mask = torch.where(aware[:, :, None, None], blocks, fixed)
        return BlockSelection.from_block_mask(mask, bs, L)

    def report(self, state) -> dict:
        out = super().report(state)
        out["gamma"], out["tau"] = self.params.gamma, self.params.tau
        return out
