"""Sparse MeZO (Liu et al., 2024): MeZO that perturbs and updates only the smallest-magnitude entries of each
weight (a `perturb_fraction` of them), where zeroth-order estimates are least noisy relative to the weight.
Pruned positions are never among them (they stay exactly zero). The selection is recomputed at the start of
every step from the current weights and held for that step only (one bool per entry, transient)."""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.errors import UserInputError
from sparseforge.methods.training.optimizers.base import is_sharded, local_tensor, param, register_optimizer
from sparseforge.methods.training.optimizers.mezo import MeZO, MeZOOptimizer, MeZOParams


@dataclasses.dataclass
class SparseMeZOParams(MeZOParams):
    perturb_fraction: float = param(0.25, "share of each tensor's (unpruned) entries perturbed: the smallest in magnitude")


class SparseMeZOOptimizer(MeZOOptimizer):
    optimizer_name = "sparse-mezo"

    def select(self, q, index):
        w = q.detach().abs().float()
        mask = self._masks.get(q)
        live = w[mask] if mask is not None else w.flatten()
        if live.numel() == 0:
            return torch.zeros(local_tensor(q).shape, dtype=torch.bool)
        k = max(1, int(round(self.cfg.perturb_fraction * live.numel())))
        threshold = live.kthvalue(k).values
        keep = w <= threshold
        if mask is not None:
            keep &= mask.to(keep.device)
        return keep


@register_optimizer
class SparseMeZO(MeZO):
    name = "sparse-mezo"
    summary = "Sparse MeZO: MeZO on the smallest-magnitude share of each weight only"
    Params = SparseMeZOParams
    optimizer_class = SparseMeZOOptimizer
    fsdp = False  # its per-tensor magnitude threshold would need the whole weight on every rank

    @classmethod
    def build(cls, model, p, trainable):
        if any(is_sharded(q) for q in trainable):
            raise UserInputError("optimizer 'sparse-mezo' does not run under FSDP; use 'mezo'")
        return super().build(model, p, trainable)

    @classmethod
    def validate(cls, p) -> None:
        super().validate(p)
        if not 0 < p.perturb_fraction <= 1:
            raise UserInputError(f"optimizer 'sparse-mezo': perturb_fraction must be in (0, 1], got {p.perturb_fraction}")
