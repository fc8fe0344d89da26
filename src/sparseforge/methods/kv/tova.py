"""TOVA (Oren et al., 2024): the newest query's attention, averaged over all heads of the layer, decides which token
goes; applied once after the prompt and then at every decode step (one token out per token in)."""
from __future__ import annotations

from sparseforge.methods.base import register
from sparseforge.methods.kv.base import KVPress, attention_mass


@register
class TOVA(KVPress):
    name = "tova"
    summary = "drop the tokens the newest query attends to least (mean over the layer's heads); works while decoding"
    query_window = 1
    decodes = True

    def score(self, module, layer, queries, index):
        mass = attention_mass(module, queries[:, :, -1:], layer.keys)
        # One ranking for the whole layer, as in the paper: every head keeps the same tokens.
        return mass.mean(dim=1, keepdim=True).expand_as(mass)
