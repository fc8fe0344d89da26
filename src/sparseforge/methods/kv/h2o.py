"""H2O (Zhang et al., 2023): heavy hitters are the tokens with the largest attention accumulated over every query
so far; the cache keeps them plus a recent window, and keeps doing so while decoding (one out per token in)."""
from __future__ import annotations

import dataclasses

from sparseforge.errors import UserInputError
from sparseforge.methods.base import param, register
from sparseforge.methods.kv.base import KVPress, KVPressParams, attention_mass, prefix, recent_bonus


@dataclasses.dataclass
class H2OParams(KVPressParams):
    recent_fraction: float = param(0.5, "share of the budget given to the most recent tokens; the rest to heavy hitters")


@register
class H2O(KVPress):
    name = "h2o"
    summary = "keep the tokens of largest accumulated attention plus a recent window; works while decoding"
    Params = H2OParams
    query_window = -1  # every query adds to the accumulated attention
    decodes = True

    @classmethod
    def validate(cls, params, where=""):
        super().validate(params, where)
        if not 0.0 <= params.recent_fraction <= 1.0:
            raise UserInputError(f"{prefix(where)}recent_fraction must lie in [0, 1], got {params.recent_fraction!r}")

    def observe(self, module, layer, queries, index):
        if queries is None:
            return
        mass = attention_mass(module, queries, layer.keys)
        acc = layer.extras.get("h2o")
        if acc is not None:
            mass[..., : acc.shape[-1]] += acc
        layer.extras["h2o"] = mass

    def compress_layer(self, module, layer, queries, index, n_keep):
        self._n_keep = n_keep
        super().compress_layer(module, layer, queries, index, n_keep)

    def score(self, module, layer, queries, index):
        acc = layer.extras["h2o"]
        recent = round(self._n_keep * self.params.recent_fraction)
        return acc + recent_bonus(acc.shape[-1], recent, acc.device)
