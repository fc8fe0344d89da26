"""SnapKV (Li et al., 2024): the last `window_size` queries of the prompt (where the question sits) vote for the
earlier tokens they attend to; votes are smoothed by 1-D average pooling so neighbours of a hit survive with it.
The window itself is always kept."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from sparseforge.methods.base import param, register
from sparseforge.methods.kv.base import KVPress, KVPressParams, attention_mass, check_positive, prefix


@dataclasses.dataclass
class SnapKVParams(KVPressParams):
    # Defaults from benchmarks/kv_snapkv_window.py on the bundled model (kvpress uses 64 and 5).
    window_size: int = param(16, "last queries of the prompt that score the earlier tokens; those tokens are kept")
    kernel_size: int = param(21, "width of the average pooling over the scores (odd); keeps a hit's neighbours with it")


@register
class SnapKV(KVPress):
    name = "snapkv"
    summary = "the prompt's last window of queries scores earlier tokens (pooled); question-aware"
    Params = SnapKVParams

    @property
    def query_window(self) -> int:  # type: ignore[override]
        return self.params.window_size

    @classmethod
    def validate(cls, params, where=""):
        super().validate(params, where)
        w = prefix(where)
        check_positive(params.window_size, w, "window_size")
        check_positive(params.kernel_size, w, "kernel_size")
        if params.kernel_size % 2 == 0:
            from sparseforge.errors import UserInputError

            raise UserInputError(f"{w}kernel_size must be odd (the pooling is centred), got {params.kernel_size}")

    def score(self, module, layer, queries, index):
        keys = layer.keys
        held = keys.shape[2]
        w = min(queries.shape[2], held)
        mass = attention_mass(module, queries[:, :, -w:], keys) / w  # [b, kv_heads, held]
        k = self.params.kernel_size
        if held > w:
            prefix = mass[..., : held - w]
            pooled = F.avg_pool1d(prefix.flatten(0, 1).unsqueeze(1), k, stride=1, padding=k // 2, count_include_pad=False)
            mass = torch.cat([pooled.view_as(prefix), torch.full_like(mass[..., held - w :], float("inf"))], dim=-1)
        else:
            mass = torch.full_like(mass, float("inf"))
        return mass
