"""AdamW, the baseline: PyTorch's own implementation (decoupled weight decay), plus mask keeping."""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.methods.training.optimizers.base import (OptimizerSpec, SparseforgeOptimizer, check_adam, param,
                                                          parameter_masks, register_optimizer)


@dataclasses.dataclass
class AdamParams:
    lr: float = param(1e-4, "learning rate")
    beta1: float = param(0.9, "decay of the first moment (mean of gradients)")
    beta2: float = param(0.999, "decay of the second moment (mean of squared gradients)")
    eps: float = param(1e-8, "added to the root of the second moment before dividing")
    weight_decay: float = param(0.0, "decoupled weight decay per step, times lr")


class TorchAdamW(SparseforgeOptimizer, torch.optim.AdamW):
    optimizer_name = "adamw"

    def __init__(self, params, masks=None, **kwargs):
        torch.optim.AdamW.__init__(self, params, **kwargs)
        self._setup_masks(masks)

    def step(self, closure=None):
        loss = torch.optim.AdamW.step(self, closure)
        self.reapply_masks()
        return loss


@register_optimizer
class AdamW(OptimizerSpec):
    name = "adamw"
    summary = "AdamW (torch.optim.AdamW): two full-size fp32 moments per parameter, the baseline"
    Params = AdamParams
    fsdp = True
    implementation = "torch.optim.AdamW"

    @classmethod
    def validate(cls, p) -> None:
        check_adam(p, cls.name)

    @classmethod
    def build(cls, model, p, trainable):
        # foreach=False: one parameter at a time, the same arithmetic on one process and on FSDP shards
        return TorchAdamW(trainable, masks=parameter_masks(model, trainable), lr=p.lr, betas=(p.beta1, p.beta2), eps=p.eps,
                          weight_decay=p.weight_decay, foreach=False)
