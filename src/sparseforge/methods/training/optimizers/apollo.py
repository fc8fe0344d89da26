"""APOLLO (Zhu et al., 2024): AdamW's per-channel scaling estimated from a random projection. Adam moments live
on R = P G (a seeded Gaussian P of r rows, drawn again every `update_gap` steps and regenerated from its seed,
never stored); each channel of the raw gradient G is scaled by ||Adam(R)|| / ||R|| over that channel, and a
norm-growth limiter keeps one step's update from growing more than `limiter` times the last. State per m x n
weight: two r-wide moments, no projection matrix (SGD-like memory). `scaling: tensor` with rank 1 is
APOLLO-Mini.

Our own code rather than `apollo-torch` (1.0.3, February 2025): it fails at construction under FSDP (apollo
issue #5) and its projection is computed on local shards; here, as for GaLore, projected gradients are gathered
one matrix at a time (see lowrank.py)."""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.errors import UserInputError
from sparseforge.methods.training.optimizers.adamw import AdamParams
from sparseforge.methods.training.optimizers.base import (OptimizerSpec, check_adam, param, parameter_masks,
                                                          register_optimizer)
from sparseforge.methods.training.optimizers.lowrank import ProjectedAdam, projectable


@dataclasses.dataclass
class ApolloParams(AdamParams):
    rank: int = param(16, "rows of the random projection per projected weight (1 with scaling: tensor is APOLLO-Mini)")
    update_gap: int = param(200, "steps between fresh random projections")
    scale: float = param(1.0, "multiplies the scaled gradient (APOLLO's alpha; the paper uses 128 for APOLLO-Mini)")
    scaling: str = param("channel", "one scaling factor per channel, or one per tensor (APOLLO-Mini)", ("channel", "tensor"))
    limiter: float = param(1.01, "largest growth of the update norm from one step to the next (0 turns it off)")
    seed: int = param(0, "seed of the random projections")
    targets: str = param("linears", "which 2-D weights are projected: linears (not embeddings or the head) or all", ("linears", "all"))


class ApolloAdamW(ProjectedAdam):
    optimizer_name = "apollo"

    def __init__(self, params, projected, masks, p: ApolloParams):
        super().__init__(params, projected, masks, p.lr, (p.beta1, p.beta2), p.eps, p.weight_decay)
        self.cfg = p
        self._index = {id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}

    def _projection(self, p, state, g) -> torch.Tensor:
        """The seeded Gaussian of this weight's current draw (N(0, 1/rank)), regenerated, never stored."""
        draw = (state["step"] - 1) // self.cfg.update_gap
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed * 1_000_003 + self._index[id(p)] * 7_919 + draw)
        side = g.shape[0] if g.shape[0] <= g.shape[1] else g.shape[1]
        return (torch.randn(self.cfg.rank, side, generator=gen) / self.cfg.rank ** 0.5).to(g.device, g.dtype)

    def project(self, p, state, g):
        proj = self._projection(p, state, g)
        return proj @ g if g.shape[0] <= g.shape[1] else g @ proj.T

    def update(self, p, state, g, r, n):
        rows = g.shape[0] <= g.shape[1]  # the projection mixed rows: channels are columns
        if self.cfg.scaling == "tensor":
            s = n.norm() / r.norm().clamp_min(1e-30)
        else:
            dim = 0 if rows else 1
            s = n.norm(dim=dim) / r.norm(dim=dim).clamp_min(1e-30)
            s = s[None, :] if rows else s[:, None]
        u = g * s * self.cfg.scale
        if self.cfg.limiter > 0:
            norm = float(u.norm())
            last = state.get("last_norm")
            if last is not None and norm > self.cfg.limiter * last:
                u = u * (self.cfg.limiter * last / norm)
                norm = self.cfg.limiter * last
            state["last_norm"] = norm
        return u


@register_optimizer
class Apollo(OptimizerSpec):
    name = "apollo"
    summary = "APOLLO: AdamW's channel scaling estimated on a seeded random projection; SGD-like state"
    Params = ApolloParams
    fsdp = True
    implementation = "sparseforge (apollo-torch fails under FSDP)"

    @classmethod
    def validate(cls, p) -> None:
        check_adam(p, cls.name)
        for what in ("rank", "update_gap"):
            if getattr(p, what) < 1:
                raise UserInputError(f"optimizer 'apollo': {what} must be >= 1, got {getattr(p, what)}")
        if p.scale <= 0:
            raise UserInputError(f"optimizer 'apollo': scale must be > 0, got {p.scale}")
        if p.limiter != 0 and p.limiter < 1:
            raise UserInputError(f"optimizer 'apollo': limiter must be 0 (off) or >= 1, got {p.limiter}")

    @classmethod
    def build(cls, model, p, trainable):
        return ApolloAdamW(trainable, projectable(model, trainable, p.rank, p.targets), parameter_masks(model, trainable), p)
