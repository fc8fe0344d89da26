"""Kernel dispatch: swap a compressed model's layers for modules that use faster kernels where measured to pay."""
from __future__ import annotations

from torch import nn

from sparseforge.core.adapter import ModelAdapter
from sparseforge.errors import UserInputError
from sparseforge.kernels.semi_structured import SemiStructuredLinear, SpeedGate, is_2of4


def use_semi_structured(model: nn.Module, gate: SpeedGate, targets=("*",), ignore=()) -> dict[str, list[str]]:
    """Replace every selected nn.Linear projection whose weight is 2:4 by a `SemiStructuredLinear` that asks
    `gate` per call. Returns {"replaced": [...], "skipped": [...]} (skipped: not 2:4, or not an nn.Linear).
    Parameters are shared, not copied, so outputs on CPU (dense fallback) are unchanged bit for bit."""
    adapter = ModelAdapter(model)
    selected = adapter.select(targets, ignore)
    if not selected:
        raise UserInputError(f"targets {list(targets)} minus ignore {list(ignore)} match no projection")
    replaced, skipped = [], []
    for name, proj in selected.items():
        if proj.kind != "linear" or type(proj.module) is not nn.Linear or not is_2of4(proj.module.weight.data):
            skipped.append(name)
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, SemiStructuredLinear(proj.module, gate))
        replaced.append(name)
    return {"replaced": replaced, "skipped": skipped}
