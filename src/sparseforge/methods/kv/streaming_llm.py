"""StreamingLLM (Xiao et al., 2023): keep the first `n_sink` tokens (attention sinks) and the most recent ones."""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.methods.base import param, register
from sparseforge.methods.kv.base import KVPress, KVPressParams, check_positive, prefix


@dataclasses.dataclass
class StreamingLLMParams(KVPressParams):
    n_sink: int = param(4, "first tokens always kept (the attention sinks)")


@register
class StreamingLLM(KVPress):
    name = "streaming_llm"
    summary = "keep the first n_sink tokens and a recent window; needs no queries, works while decoding"
    Params = StreamingLLMParams
    decodes = True

    @classmethod
    def validate(cls, params, where=""):
        super().validate(params, where)
        check_positive(params.n_sink, prefix(where), "n_sink", minimum=0)

    def score(self, module, layer, queries, index):
        # Held tokens stay in arrival order, so the index is the age; sinks outrank everything.
        held = layer.held()
        score = torch.arange(held, device=layer.keys.device, dtype=torch.float32)
        score[: self.params.n_sink] = float("inf")
        return score.expand(layer.keys.shape[0], layer.keys.shape[1], held)
