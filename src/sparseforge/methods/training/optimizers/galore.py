"""GaLore (Zhao et al., 2024): Adam on the gradient projected onto its top-`rank` singular subspace, refreshed
by an SVD every `update_gap` steps. State per m x n weight (m >= n): the n x r projection plus two m x r
moments, instead of AdamW's two m x n.

Our own code rather than `galore-torch` (1.0, March 2024, unmaintained): it does not compose with FSDP (galore
issue #2) and its layer-wise mode steps inside the backward pass, which breaks gradient accumulation. Here the
layer-wise mode (`layerwise: true`) steps each weight in its post-accumulate-grad hook on the last of
`accumulation_steps` micro-batches; on the micro-batches before, it folds the gradient into its r-wide
projection and frees the full one (projection is linear, so the sum is the same), except on refresh steps,
where the SVD needs the whole accumulated gradient and the full gradient is kept for that step."""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.errors import UserInputError
from sparseforge.methods.training.optimizers.adamw import AdamParams
from sparseforge.methods.training.optimizers.base import (OptimizerSpec, check_adam, is_sharded, param, parameter_masks,
                                                          register_optimizer)
from sparseforge.methods.training.optimizers.lowrank import ProjectedAdam, projectable


@dataclasses.dataclass
class GaLoreParams(AdamParams):
    rank: int = param(16, "width of the gradient subspace per projected weight")
    update_gap: int = param(200, "steps between SVD refreshes of the projection")
    scale: float = param(0.25, "multiplies the projected-back update (GaLore's alpha)")
    svd: str = param("exact", "how the refresh finds the subspace: exact SVD, or a seeded randomized range finder (2 power iterations; for large weights)", ("exact", "randomized"))
    seed: int = param(0, "seed of the randomized range finder")
    targets: str = param("linears", "which 2-D weights are projected: linears (not embeddings or the head) or all", ("linears", "all"))
    layerwise: bool = param(False, "step each weight during backward and free its gradient at once (less memory)")
    accumulation_steps: int = param(1, "micro-batches per step in layer-wise mode (backward calls before a step)")


class GaLoreAdamW(ProjectedAdam):
    optimizer_name = "galore"

    def __init__(self, params, projected, masks, p: GaLoreParams):
        super().__init__(params, projected, masks, p.lr, (p.beta1, p.beta2), p.eps, p.weight_decay)
        self.rank, self.update_gap, self.scale = p.rank, p.update_gap, p.scale
        self.layerwise, self.accumulation_steps = p.layerwise, p.accumulation_steps
        self.svd, self.seed = p.svd, p.seed
        self._index = {id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
        self._hooks = []
        if self.layerwise:
            for group in self.param_groups:
                for q in group["params"]:
                    self._hooks.append(q.register_post_accumulate_grad_hook(self._hook))

    # -- the projection --------------------------------------------------------------------------------------
    def _due(self, state, done: int) -> bool:
        """Whether step `done + 1` refreshes the projection: steps 1, 1 + gap, 1 + 2 gap, ..."""
        return "proj" not in state or done % self.update_gap == 0

    def project(self, p, state, g):
        if self._due(state, state["step"] - 1):  # step_param has counted the step being taken
            # the top singular vectors of the smaller side: m >= n projects rows onto n x r, else columns
            u, vh = self._top_singular(g, p, state["step"])
            state["proj"] = (vh[: self.rank].T if g.shape[0] >= g.shape[1] else u[:, : self.rank]).contiguous()
        return self._down(state["proj"], g)

    def _top_singular(self, g, p, step):
        """Left and right singular vectors of g (at least the top `rank`): exact, or a randomized range finder
        (Halko et al.) seeded per weight and step, so every FSDP rank and every rerun finds the same subspace.
        An exact SVD of a 4096 x 4096 matrix takes about 100 s on one busy CPU core; the range finder costs a few
        matrix products of width rank + 8."""
        if self.svd == "exact":
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            return u, vh
        width = min(self.rank + 8, *g.shape)
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self._index[id(p)] * 7_919 + step)
        omega = torch.randn(g.shape[1], width, generator=gen, dtype=g.dtype).to(g.device)
        q, _ = torch.linalg.qr(g @ omega)
        for _ in range(2):  # power iterations sharpen the subspace when the spectrum decays slowly
            q, _ = torch.linalg.qr(g.T @ q)
            q, _ = torch.linalg.qr(g @ q)
        ub, _, vh = torch.linalg.svd(q.T @ g, full_matrices=False)
        return q @ ub, vh

    @staticmethod
    def _down(proj, g):
        return g @ proj if g.shape[0] >= g.shape[1] else proj.T @ g

    def update(self, p, state, g, r, n):
        proj = state["proj"]
        return (n @ proj.T if p.shape[0] >= p.shape[1] else proj @ n) * self.scale

    # -- layer-wise mode ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _hook(self, q) -> None:
        state = self.state[q]
        state["micro"] = state.get("micro", 0) + 1
        last = state["micro"] == self.accumulation_steps
        group = self._group_of(q)
        if self.is_projected(q) and not self._due(state, state.get("step", 0)):
            low = self._down(state["proj"], q.grad.float() if q.grad.element_size() < 4 else q.grad)
            state["low_grad"] = low if "low_grad" not in state else state["low_grad"].add_(low)
            q.grad = None  # the full gradient is not kept between micro-batches
            if last:
                self.step_param(q, group, None, low=state.pop("low_grad"))
        elif last:
            self.step_param(q, group, q.grad.float() if q.grad.element_size() < 4 else q.grad)
            q.grad = None
        if last:
            state["micro"] = 0

    def _group_of(self, q):
        for group in self.param_groups:
            if any(x is q for x in group["params"]):
                return group
        raise KeyError("parameter not in this optimizer")  # pragma: no cover

    def step(self, closure=None):
        if self.layerwise:  # the hooks did the work during backward
            if closure is not None:
                with torch.enable_grad():
                    return closure()
            return None
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True):
        if not self.layerwise:
            super().zero_grad(set_to_none)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


@register_optimizer
class GaLore(OptimizerSpec):
    name = "galore"
    summary = "GaLore: Adam on an SVD-projected low-rank gradient refreshed every update_gap steps; layer-wise mode"
    Params = GaLoreParams
    fsdp = True
    implementation = "sparseforge (galore-torch does not compose with FSDP)"

    @classmethod
    def validate(cls, p) -> None:
        check_adam(p, cls.name)
        for what in ("rank", "update_gap", "accumulation_steps"):
            if getattr(p, what) < 1:
                raise UserInputError(f"optimizer 'galore': {what} must be >= 1, got {getattr(p, what)}")
        if p.scale <= 0:
            raise UserInputError(f"optimizer 'galore': scale must be > 0, got {p.scale}")
        if p.accumulation_steps > 1 and not p.layerwise:
            raise UserInputError("optimizer 'galore': accumulation_steps is for layerwise mode; without it the trainer accumulates")

    @classmethod
    def build(cls, model, p, trainable):
        if p.layerwise and any(is_sharded(q) for q in trainable):
            raise UserInputError("optimizer 'galore': layerwise mode does not run under FSDP; set layerwise: false")
        return GaLoreAdamW(trainable, projectable(model, trainable, p.rank, p.targets), parameter_masks(model, trainable), p)
