"""Shared base of the kernel runtime stages: each measures a speed gate at compress time (its whole state) and
routes projections through its kernel only where the gate found it faster than dense."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from sparseforge.errors import UserInputError
from sparseforge.methods.base import RuntimeMethod, param


@dataclasses.dataclass
class GateParams:
    token_counts: list[int] = param([1, 16, 128, 512], "token counts per product at which the gate times the kernel against dense")
    repeats: int = param(10, "timed calls per (shape, token count); the gate keeps the median")
    warmup: int = param(3, "untimed calls before timing")
    margin: float = param(0.05, "the kernel is chosen only where it was faster than dense by more than this fraction")


class KernelStage(RuntimeMethod):
    family: ClassVar[str] = "kernels"

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        counts = params.token_counts
        if not counts or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in counts):
            raise UserInputError(f"{where}token_counts must be a non-empty list of positive integers, e.g. [1, 16, 128, 512]")
        if params.repeats < 1 or params.warmup < 0:
            raise UserInputError(f"{where}repeats must be >= 1 and warmup >= 0 (e.g. 10 and 3)")
        if not 0 <= params.margin < 1:
            raise UserInputError(f"{where}margin {params.margin} must be in [0, 1), e.g. 0.05")
