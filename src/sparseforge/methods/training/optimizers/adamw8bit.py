"""AdamW with 8-bit state: torchao's `AdamW8bit` (block-wise quantised moments, 256 values per block with one
fp32 scale, a dynamic-tree code map; tensors under 4096 values keep fp32 state, as in bitsandbytes). torchao is
maintained and composes with FSDP2 (its state is created per local shard). An optional dependency
(`pip install 'sparseforge[optim8bit]'`): the optimizer is registered only where torchao is installed. On CPU it runs through
torch.compile: the first step in a fresh process compiles (about 30 s on 2 cores with an empty inductor cache,
about 3 s with a warm one), later steps are fast."""
from __future__ import annotations

import dataclasses
import importlib.util

import torch

from sparseforge.errors import UserInputError
from sparseforge.methods.training.optimizers.adamw import AdamParams
from sparseforge.methods.training.optimizers.base import (OptimizerSpec, SparseforgeOptimizer, check_adam, param,
                                                          parameter_masks, register_optimizer)


@dataclasses.dataclass
class AdamW8bitParams(AdamParams):
    block_size: int = param(256, "values per quantisation block (one fp32 scale each)")


def _torchao_class():
    try:
        from torchao.optim import AdamW8bit
    except ImportError as exc:  # pragma: no cover - torchao is a dependency
        raise UserInputError(f"optimizer 'adamw-8bit' needs torchao: pip install torchao ({exc})") from None
    return AdamW8bit


def _make(base):
    class TorchaoAdamW8bit(SparseforgeOptimizer, base):
        optimizer_name = "adamw-8bit"

        def __init__(self, params, masks=None, **kwargs):
            base.__init__(self, params, **kwargs)
            self._setup_masks(masks)

        def step(self, closure=None):
            for group in self.param_groups:  # schedulers (ours, Hugging Face's) write a float; torchao wants a tensor
                if not torch.is_tensor(group["lr"]):
                    group["lr"] = torch.tensor(float(group["lr"]))
            loss = base.step(self, closure)
            self.reapply_masks()
            return loss

        def flatten_state_tensor(self, value):
            from torchao.optim.subclass_8bit import OptimState8bit

            if not isinstance(value, OptimState8bit):
                return None
            return {"codes": value.codes, "scale": value.scale, "qmap": value.qmap}, {"signed": bool(value.signed)}

        def unflatten_state_tensor(self, parts, meta):
            from torchao.optim.subclass_8bit import OptimState8bit

            return OptimState8bit(parts["codes"], parts["scale"], parts["qmap"], meta["signed"])

        def prepare_groups(self, groups):
            # torchao keeps lr as a tensor (so a scheduler does not recompile the step); JSON made it a float
            return [dict(g, lr=torch.tensor(g["lr"])) for g in groups]

    return TorchaoAdamW8bit


AVAILABLE = importlib.util.find_spec("torchao") is not None  # registered only where torchao is installed


class AdamW8bit(OptimizerSpec):
    name = "adamw-8bit"
    summary = "AdamW with block-wise 8-bit moments (torchao.optim.AdamW8bit): about a quarter of AdamW's state"
    Params = AdamW8bitParams
    fsdp = True
    implementation = "torchao.optim.AdamW8bit"

    @classmethod
    def validate(cls, p) -> None:
        check_adam(p, cls.name)
        if p.block_size < 1:
            raise UserInputError(f"optimizer 'adamw-8bit': block_size must be >= 1, got {p.block_size}")

    @classmethod
    def build(cls, model, p, trainable):
        opt_cls = _make(_torchao_class())
        return opt_cls(trainable, masks=parameter_masks(model, trainable), lr=p.lr, betas=(p.beta1, p.beta2), eps=p.eps,
                       weight_decay=p.weight_decay, block_size=p.block_size)


if AVAILABLE:
    register_optimizer(AdamW8bit)
