"""MeZO (Malladi et al., 2023): zeroth-order SPSA fine-tuning in inference memory. Each step draws a Gaussian
direction z from a seed, measures the loss at theta + eps z and theta - eps z (two forward passes through the
closure, no backward), and moves theta by -lr * g * z with g = (L+ - L-) / (2 eps). z is never stored: it is
regenerated from the step's seed for each use, one parameter at a time, so the extra memory is one
parameter-sized buffer. Under FSDP every rank draws the same full z and uses its rows, and the two losses are
averaged over ranks (data parallel). Gradient accumulation: the closure sees the whole batch, so a closure that
loops over micro-batches and returns their mean loss is accumulation.

`step(closure)` returns the mean of the two perturbed losses (the loss at theta is never computed)."""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.errors import UserInputError
from sparseforge.methods.training.optimizers.base import (OptimizerSpec, SparseforgeOptimizer, check_positive, is_sharded,
                                                          local_mask, local_rows, local_tensor, param, parameter_masks,
                                                          register_optimizer)


@dataclasses.dataclass
class MeZOParams:
    lr: float = param(1e-6, "learning rate (MeZO is sensitive to it: 1e-7 to 1e-5 for fine-tuning LMs)")
    eps: float = param(1e-3, "perturbation size")
    weight_decay: float = param(0.0, "weight decay per step, times lr")
    seed: int = param(0, "seed of the perturbation directions (step t uses a seed derived from it and t)")


class MeZOOptimizer(SparseforgeOptimizer, torch.optim.Optimizer):
    optimizer_name = "mezo"
    zeroth_order = True

    def __init__(self, params, masks, p):
        torch.optim.Optimizer.__init__(self, params, dict(lr=p.lr, eps=p.eps, weight_decay=p.weight_decay))
        self.cfg = p
        self._setup_masks(masks)
        self._params = [q for g in self.param_groups for q in g["params"]]
        self._keep: dict[int, torch.Tensor] = {}  # per step only: which entries a sparse variant perturbs
        self.state["mezo"] = {"step": 0}  # plain counters, saved as JSON

    def _direction(self, q, index: int, step_seed: int) -> torch.Tensor:
        """z for parameter `index` at this step: full size from the seed, this rank's rows, masked."""
        gen = torch.Generator(device="cpu").manual_seed(step_seed * 65_537 + index)
        z = torch.randn(q.shape, generator=gen, dtype=torch.float32)
        z = local_rows(z, q)
        mask = self._masks.get(q)
        if mask is not None:
            z = z * local_mask(mask, q).to(z.dtype)  # pruned positions are never perturbed
        keep = self._keep.get(index)
        if keep is not None:
            z = z * keep.to(z.dtype)
        local = local_tensor(q)
        return z.to(local.device, local.dtype)

    @torch.no_grad()
    def _shift(self, step_seed: int, scale: float) -> None:
        for i, q in enumerate(self._params):
            local_tensor(q).add_(self._direction(q, i, step_seed), alpha=scale)

    def select(self, q, index: int) -> torch.Tensor | None:
        """Which entries of `q` to perturb this step (None: all). Sparse MeZO overrides this."""
        return None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise UserInputError("optimizer 'mezo' is zeroth-order: call step(closure) with a closure that returns the loss")
        counters = self.state["mezo"]
        counters["step"] += 1
        step_seed = self.cfg.seed * 1_000_003 + counters["step"]
        eps = self.cfg.eps
        self._keep = {}
        for i, q in enumerate(self._params):
            keep = self.select(q, i)
            if keep is not None:
                self._keep[i] = keep
        self._shift(step_seed, +eps)
        plus = float(closure())
        self._shift(step_seed, -2 * eps)
        minus = float(closure())
        self._shift(step_seed, +eps)
        losses = torch.tensor([plus, minus], dtype=torch.float64)
        if any(is_sharded(q) for q in self._params):
            import torch.distributed as dist

            dist.all_reduce(losses)  # data parallel: the projected gradient of the mean loss over ranks
            losses /= dist.get_world_size()
        g = float(losses[0] - losses[1]) / (2 * eps)
        index = {id(q): i for i, q in enumerate(self._params)}
        for group in self.param_groups:
            for q in group["params"]:
                i = index[id(q)]
                local = local_tensor(q)
                if group["weight_decay"]:
                    local.mul_(1 - group["lr"] * group["weight_decay"])
                local.add_(self._direction(q, i, step_seed), alpha=-group["lr"] * g)
        self._keep = {}
        self.reapply_masks()
        counters["projected_grad"] = g
        return torch.tensor(float(losses.mean()))


@register_optimizer
class MeZO(OptimizerSpec):
    name = "mezo"
    summary = "MeZO: zeroth-order SPSA with seed-regenerated perturbations, two forward passes a step, inference memory"
    Params = MeZOParams
    zeroth_order = True
    fsdp = True
    optimizer_class = MeZOOptimizer

    @classmethod
    def validate(cls, p) -> None:
        check_positive(p.lr, "lr", cls.name)
        check_positive(p.eps, "eps", cls.name)
        check_positive(p.weight_decay, "weight_decay", cls.name, allow_zero=True)

    @classmethod
    def build(cls, model, p, trainable):
        return cls.optimizer_class(trainable, parameter_masks(model, trainable), p)
