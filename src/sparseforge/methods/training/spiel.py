"""Sparse fine-tuning in SpIEL's way (Ansell et al., 2024, "Scaling Sparse Fine-Tuning to Large Language
Models"): each targeted weight W0 stays frozen and gets a fixed budget of k (index, delta) pairs, W = W0 +
scatter(delta at index). Training updates only the deltas; every `update_every` steps the `swap` share of the
pairs with the smallest |delta| is dropped (those weights return to W0) and as many new indices are grown where
the gradient of the whole weight, accumulated since the last update, is largest (SpIEL-AG). New pairs start at
delta 0 with fresh optimizer state.

Indices are drawn only from positions the pruning mask keeps, so the merged weight W0 + delta keeps the exact
pattern. The sum is a `torch.nn.utils.parametrize` parametrization of the weight, removed (merged) at the end;
its gradient hook is where the dense gradient for regrowth is accumulated. Memory: k deltas and indices per
weight, plus one dense fp32 accumulator per weight (what SpIEL-AG needs; SpIEL-MA would replace it by SM3 moments).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.sparsity_masks import masks_of
from sparseforge.errors import UserInputError
from sparseforge.methods.base import param, register
from sparseforge.methods.training.base import RecoveryMethod, TrainingParams, freeze


@dataclasses.dataclass
class SpielParams(TrainingParams):
    lr: float = param(2e-3, "peak learning rate of the deltas")
    density: float = param(0.02, "budget: (index, delta) pairs per targeted weight, as a share of its positions")
    update_every: int = param(20, "steps between prune-and-regrow updates of the index set")
    swap: float = param(0.2, "share of each budget dropped (smallest |delta|) and regrown (largest accumulated gradient) per update")


class SparseDelta(nn.Module):
    """Parametrization W0 -> W0 + scatter(delta at index), with the gradient of the whole weight accumulated."""

    def __init__(self, index: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("index", index)
        self.delta = nn.Parameter(torch.zeros(index.numel(), dtype=dtype, device=index.device))
        self.accumulated: torch.Tensor | None = None

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        out = w0.reshape(-1).index_add(0, self.index, self.delta.to(w0.dtype)).view_as(w0)
        if out.requires_grad:
            out.register_hook(self._accumulate)
        return out

    def _accumulate(self, grad: torch.Tensor):
        g = grad.detach().float().reshape(-1)
        self.accumulated = g.clone() if self.accumulated is None else self.accumulated.add_(g)
        return grad


@register
class Spiel(RecoveryMethod):
    name = "spiel"
    summary = "recovery after pruning: sparse fine-tuning, a fixed budget of (index, delta) pairs inside the mask, pruned by |delta| and regrown by accumulated gradient"
    Params = SpielParams

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        super().validate(params, where)
        w = f"{where}: " if where else ""
        if not 0.0 < params.density <= 1.0:
            raise UserInputError(f"{w}'density' of 'spiel' must be in (0, 1], got {params.density}")
        if params.update_every < 1:
            raise UserInputError(f"{w}'update_every' of 'spiel' must be at least 1, got {params.update_every}")
        if not 0.0 <= params.swap <= 1.0:
            raise UserInputError(f"{w}'swap' of 'spiel' must be in [0, 1], got {params.swap}")

    def prepare(self, model, targets, ignore):
        freeze(model)
        handle = masks_of(model)
        g = torch.Generator().manual_seed(self.params.seed)
        self._deltas: dict[str, SparseDelta] = {}
        self._allowed: dict[str, torch.Tensor] = {}
        for name, proj in ModelAdapter(model).select(targets, ignore).items():
            w0 = proj.parameter
            keep = handle.mask_for(w0) if handle is not None else None
            allowed = (keep if keep is not None else torch.ones_like(w0, dtype=torch.bool)).reshape(-1)
            candidates = allowed.nonzero().squeeze(1).cpu()
            k = min(len(candidates), max(1, int(self.params.density * w0.numel())))
            if k == 0:
                continue
            index = candidates[torch.randperm(len(candidates), generator=g)[:k]].sort().values.to(w0.device)
            delta = SparseDelta(index, w0.dtype)
            parametrize.register_parametrization(proj.module, proj.param_name, delta)
            self._deltas[name] = delta
            self._allowed[name] = allowed
        if not self._deltas:
            raise UserInputError(f"'spiel' found no weight to fine-tune with targets {list(targets)}")
        self._updates = 0
        return model

    @torch.no_grad()
    def on_step_end(self, step, work, optimizer):
        if (step + 1) % self.params.update_every:
            return
        for name, d in self._deltas.items():
            n = int(self.params.swap * d.index.numel())
            if n and d.accumulated is not None:
                self._swap(name, d, n, optimizer)
            d.accumulated = None
        self._updates += 1

    @torch.no_grad()
    def _swap(self, name: str, d: SparseDelta, n: int, optimizer) -> None:
        # Drop the n smallest |delta| (stable: ties go by slot), then grow at the n largest accumulated |gradient|
        # among allowed positions held neither now nor just before (growing back a just-dropped position would only
        # reset its delta to 0).
        slots = torch.argsort(d.delta.abs(), stable=True)[:n]
        held = torch.zeros_like(self._allowed[name])
        held[d.index] = True
        score = d.accumulated.abs().masked_fill(~self._allowed[name] | held, -1.0)
        grown = torch.argsort(score, descending=True, stable=True)[:n]
        grown = grown[score[grown] >= 0]  # fewer allowed positions than n: keep the rest
        slots = slots[: grown.numel()]
        d.index[slots] = grown
        d.delta[slots] = 0
        # Fresh optimizer state for the reused slots: any state tensor shaped like the delta (Adam's moments, ...).
        for value in getattr(optimizer, "state", {}).get(d.delta, {}).values():
            if torch.is_tensor(value) and value.shape == d.delta.shape:
                value[slots] = 0

    def finish(self, model, work):
        for name, proj in ModelAdapter(model).select(["*"]).items():
            if name in self._deltas:
                parametrize.remove_parametrizations(proj.module, proj.param_name, leave_parametrized=True)
        handle = masks_of(model)
        if handle is not None:
            handle.enforce()  # no-op by construction (indices lie inside the mask); kept as the guarantee
        return model

    def state(self):
        tensors = {}
        for name, d in self._deltas.items():
            tensors[f"{name}.index"] = d.index
            if d.accumulated is not None:
                tensors[f"{name}.accumulated"] = d.accumulated
        return tensors, {"updates": self._updates}

    def load_state(self, tensors, data):
        for name, d in self._deltas.items():
            d.index.copy_(tensors[f"{name}.index"])
            acc = tensors.get(f"{name}.accumulated")
            d.accumulated = acc.clone() if acc is not None else None
        self._updates = int(data.get("updates", 0))

    def report_fields(self):
        return {"density": self.params.density, "pairs": sum(d.index.numel() for d in self._deltas.values()),
                "updates": getattr(self, "_updates", 0), "weights": len(self._deltas)}
