"""Key-norm press (Devoto et al., 2024): keys with a small L2 norm draw the most attention, so the largest are
dropped. Needs no queries."""
from __future__ import annotations

from sparseforge.methods.base import register
from sparseforge.methods.kv.base import KVPress


@register
class KeyNorm(KVPress):
    name = "knorm"
    summary = "drop the keys of largest L2 norm; needs no queries, works while decoding"
    decodes = True

    def score(self, module, layer, queries, index):
        return -layer.keys.float().norm(dim=-1)
