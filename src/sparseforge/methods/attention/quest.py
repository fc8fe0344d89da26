"""Quest: query-aware page selection while decoding. The cached keys are cut into pages of `page_size` tokens; the
per-channel minimum and maximum of each page's keys bound the score any key of the page can reach with the current
query (sum over channels of max(q * min, q * max)); each query head attends only the `token_budget // page_size`
pages with the highest bounds (the newest page always), each step.

The page bounds of full pages are kept between steps and checked against the cache (the first and last key of
every cached page must be unchanged), so a cache that a KV press compressed, or a new prompt, is re-paged from
what it holds now: Quest composes with the presses and pages whatever they kept."""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.kernels.block_sparse_attention import num_blocks
from sparseforge.methods.attention.base import SparseDecode, check_int, prefix
from sparseforge.methods.base import param, register


@dataclasses.dataclass
class QuestParams:
    page_size: int = param(16, "tokens per page (the unit of selection)")
    token_budget: int = param(512, "tokens each query head attends per decode step (whole pages); caches up to this size run dense")
    gate: str = param("auto", "auto: Quest only from the cache length where it was measured faster than SDPA on this device (none on CPU: dense); always: every step past the budget", ("auto", "always"))


# First cache length where a Quest step beat SDPA, per device (benchmarks/results/attention_decode.md). On CPU it
# lost at every length measured (the page bounds, checks and gathers cost more than the dense step), so none.
CROSSOVER: dict[str, int] = {}


@dataclasses.dataclass
class _Pages:
    full: int  # full pages summarised
    mins: torch.Tensor  # [b, kv_heads, full, d]
    maxs: torch.Tensor
    firsts: torch.Tensor  # first and last key of each summarised page, to notice a changed cache
    lasts: torch.Tensor


def page_bounds(keys: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page channel minimum and maximum of `keys` `[b, h, P * page, d]` -> two `[b, h, P, d]`."""
    b, h, S, d = keys.shape
    view = keys.view(b, h, S // page, page, d)
    return view.amin(3), view.amax(3)


@register
class Quest(SparseDecode):
    name = "quest"
    summary = "decode attends per head the cache pages whose min/max key bounds score highest (Quest)"
    Params = QuestParams

    def __init__(self, params=None):
        super().__init__(params)
        self._pages: dict[int, _Pages] = {}
        self.steps = {"sparse": 0, "dense": 0}

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        check_int(params.page_size, prefix(where), "page_size")
        check_int(params.token_budget, prefix(where), "token_budget", minimum=params.page_size if isinstance(params.page_size, int) else 1)

    @classmethod
    def example_params(cls) -> dict:
        return {"page_size": 4, "token_budget": 12, "gate": "always"}

    def detach(self, model) -> None:
        super().detach(model)
        self._pages = {}

    def pages(self, index: int, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds of every full page of `keys`, reusing the summaries of pages that did not change."""
        ps = self.params.page_size
        full = keys.shape[2] // ps
        cached = self._pages.get(index)
        if cached is not None and (cached.full > full or cached.mins.shape[:2] != keys.shape[:2]):
            cached = None
        if cached is not None and cached.full:
            end = cached.full * ps
            same = torch.equal(keys[:, :, 0:end:ps], cached.firsts) and torch.equal(keys[:, :, ps - 1:end:ps], cached.lasts)
            cached = cached if same else None
        if cached is None:
            cached = _Pages(0, *(keys.new_zeros(*keys.shape[:2], 0, keys.shape[3]) for _ in range(4)))
        if full > cached.full:
            lo, hi = cached.full * ps, full * ps
            mins, maxs = page_bounds(keys[:, :, lo:hi], ps)
            cached = _Pages(full, torch.cat([cached.mins, mins], 2), torch.cat([cached.maxs, maxs], 2),
                            torch.cat([cached.firsts, keys[:, :, lo:hi:ps]], 2),
                            torch.cat([cached.lasts, keys[:, :, lo + ps - 1:hi:ps]], 2))
        self._pages[index] = cached
        return cached.mins, cached.maxs

    def select_pages(self, index: int, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Page ids each query head attends, `[b, q_heads, n]`, the newest page (full or partial) included."""
        ps = self.params.page_size
        b, hq, _, d = q.shape
        hkv = keys.shape[1]
        S = keys.shape[2]
        pages = num_blocks(S, ps)
        mins, maxs = self.pages(index, keys)
        if pages > mins.shape[2]:  # the partial newest page
            tail = keys[:, :, mins.shape[2] * ps:]
            mins = torch.cat([mins, tail.amin(2, keepdim=True)], 2)
            maxs = torch.cat([maxs, tail.amax(2, keepdim=True)], 2)
        qg = q.view(b, hkv, hq // hkv, d)
        bound = torch.maximum(qg[..., None, :] * mins[:, :, None], qg[..., None, :] * maxs[:, :, None]).sum(-1)
        bound = bound.reshape(b, hq, pages)
        bound[..., -1] = float("inf")
        n = min(pages, max(1, self.params.token_budget // ps))
        return bound.topk(n, -1).indices

    def run_decode(self, module, index, q, k, v, scale):
        ps = self.params.page_size
        b, hq, _, d = q.shape
        hkv, S = k.shape[1], k.shape[2]
        start = CROSSOVER.get(q.device.type) if self.params.gate == "auto" else 0
        if S <= self.params.token_budget or start is None or S < start:
            self.steps["dense"] += 1
            return None
        self.steps["sparse"] += 1
        chosen = self.select_pages(index, q, k)  # [b, hq, n]
        P = num_blocks(S, ps)
        pad = P * ps - S
        kp = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(b, hkv, P, ps, d)
        vp = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(b, hkv, P, ps, d)
        bi = torch.arange(b, device=q.device)[:, None, None]
        hi = (torch.arange(hq, device=q.device) // (hq // hkv))[None, :, None]
        keys = kp[bi, hi, chosen].reshape(b, hq, -1, d)  # [b, hq, n * ps, d]
        values = vp[bi, hi, chosen].reshape(b, hq, -1, d)
        pos = (chosen[..., None] * ps + torch.arange(ps, device=q.device)).reshape(b, hq, 1, -1)
        scores = (q @ keys.transpose(-1, -2)) * scale
        scores = scores.masked_fill(pos >= S, float("-inf"))
        return scores.softmax(-1) @ values

    def report(self, state) -> dict:
        return {"slot": self.slot, "page_size": self.params.page_size, "token_budget": self.params.token_budget, "gate": self.params.gate}
