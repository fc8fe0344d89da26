"""Optimizers for training with sparseforge (recovery fine-tuning after pruning): one registry, one file each.

    opt = build_optimizer("galore", model, {"rank": 16}, trainable=[p for p in model.parameters() if p.requires_grad])

First-order optimizers are `torch.optim.Optimizer`s; a zeroth-order one (`opt.zeroth_order`) is stepped with
`opt.step(closure)` where `closure()` runs a forward pass (no backward) and returns the loss."""
from __future__ import annotations

from typing import Any

from torch import nn

from sparseforge.errors import UserInputError
from sparseforge.methods.training.optimizers.base import (OPTIMIZERS, OptimizerSpec, get_optimizer, load_optimizer_state,
                                                          optimizer_state_tensors, register_optimizer, state_bytes)
from sparseforge.methods.training.optimizers import adamw, adamw8bit, apollo, galore, mezo, sparse_mezo  # noqa: F401  (registers)


def optimizer_names() -> list[str]:
    return sorted(OPTIMIZERS)


def build_optimizer(name: str, model: nn.Module, params: dict[str, Any] | Any, trainable: list[nn.Parameter]):
    """The optimizer `name` over `trainable` (parameters of `model`), with `params` (a dict of its Params fields,
    or a Params instance). Bad names or values raise a one-line UserInputError."""
    spec = get_optimizer(name)
    parsed = spec.parse_params(params)
    trainable = list(trainable)
    if not trainable:
        raise UserInputError(f"optimizer '{name}' got no trainable parameters")
    opt = spec.build(model, parsed, trainable)
    opt.optimizer_name = name
    opt.zeroth_order = spec.zeroth_order
    return opt


__all__ = ["OPTIMIZERS", "OptimizerSpec", "build_optimizer", "get_optimizer", "load_optimizer_state", "optimizer_names",
           "optimizer_state_tensors", "register_optimizer", "state_bytes"]
