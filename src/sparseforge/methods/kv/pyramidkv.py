"""PyramidKV (Cai et al., 2024): SnapKV scoring with budgets that shrink linearly from the first layer to the last
(lower layers attend broadly, upper ones to few tokens). The budgets average to the SnapKV budget, so the cache's
total size is the same for the same compression_ratio."""
from __future__ import annotations

import dataclasses

from sparseforge.errors import UserInputError
from sparseforge.methods.base import param, register
from sparseforge.methods.kv.base import prefix
from sparseforge.methods.kv.snapkv import SnapKV, SnapKVParams


@dataclasses.dataclass
class PyramidKVParams(SnapKVParams):
    beta: float = param(20.0, "the last layer keeps 1/beta of the mean budget; the first keeps 2 - 1/beta of it")


@register
class PyramidKV(SnapKV):
    name = "pyramidkv"
    summary = "SnapKV scores with per-layer budgets shrinking linearly from the bottom layer to the top"
    Params = PyramidKVParams

    @classmethod
    def validate(cls, params, where=""):
        super().validate(params, where)
        if not isinstance(params.beta, (int, float)) or params.beta < 1:
            raise UserInputError(f"{prefix(where)}beta must be >= 1, got {params.beta!r}")

    def num_layers(self) -> int:
        return max(1, len(self._modules))

    def target(self, index: int, tokens: int) -> int:
        mean = tokens * (1.0 - self.params.compression_ratio)
        n = self.num_layers()
        if n == 1 or self.params.compression_ratio == 0:
            return max(1, min(tokens, round(mean)))
        low = mean / self.params.beta
        high = 2 * mean - low
        share = high - (high - low) * index / (n - 1)
        return max(1, min(tokens, round(share)))
