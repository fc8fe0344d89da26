"""Head-level KV compression in the style of DuoAttention (Xiao et al., 2024) and RazorAttention (Tang et al.,
2024): a few "retrieval" KV heads keep the whole cache, every other ("streaming") head keeps only the attention
sinks and a recent window, with that memory really freed (each layer holds two tensors, one per head group).

Calibration finds the retrieval heads on synthetic passkey prompts: for each KV head, the attention the answer
positions pay to the planted passkey, averaged over its query group and the episodes. The `compression_ratio`
fraction of KV heads (over all layers) with the least of it become streaming heads. The state is the per-head flag
tensor `retrieval_heads` `[layers, kv_heads]` (bool), saved with the artifact.

Attention over the two groups runs through the model's own attention implementation, once per group, each with a
mask sized for that group (the wrapper in base.py hands the layer its queries).
"""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.data import read_text
from sparseforge.data.synthetic import episodes
from sparseforge.errors import UserInputError
from sparseforge.methods.base import RuntimeState, param, register
from sparseforge.methods.kv.base import KVPress, KVPressParams, PressLayer, attention_mass, check_positive, fit_mask, prefix


class HeadSplitLayer(PressLayer):
    """`keys`/`values` hold the retrieval heads (every token); `stream_keys`/`stream_values` the streaming heads
    (sinks + window once trimmed)."""

    def __init__(self, full_heads: torch.Tensor, stream_heads: torch.Tensor, n_sink: int, window: int):
        super().__init__()
        self.full_heads, self.stream_heads = full_heads, stream_heads
        self.n_sink, self.window = n_sink, window
        self.stream_keys = self.stream_values = None
        self.reference_shape = None

    @classmethod
    def adopt(cls, old, **kwargs) -> "HeadSplitLayer":
        new = cls(**kwargs)
        if getattr(old, "is_initialized", False) and old.keys is not None and old.keys.numel() > 0:
            new.update(old.keys, old.values)
        return new

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            b, h, _, d = key_states.shape
            self.reference_shape = (b, h, d, key_states.dtype)
            self.full_heads = self.full_heads.to(key_states.device)
            self.stream_heads = self.stream_heads.to(key_states.device)
            self.stream_keys = key_states.new_empty(b, len(self.stream_heads), 0, d)
            self.stream_values = value_states.new_empty(b, len(self.stream_heads), 0, value_states.shape[-1])
            self.keys = key_states.new_empty(b, len(self.full_heads), 0, d)
            self.values = value_states.new_empty(b, len(self.full_heads), 0, value_states.shape[-1])
        self.keys = torch.cat([self.keys, key_states.index_select(1, self.full_heads)], dim=-2)
        self.values = torch.cat([self.values, value_states.index_select(1, self.full_heads)], dim=-2)
        self.stream_keys = torch.cat([self.stream_keys, key_states.index_select(1, self.stream_heads)], dim=-2)
        self.stream_values = torch.cat([self.stream_values, value_states.index_select(1, self.stream_heads)], dim=-2)
        self.seen += key_states.shape[-2]
        self.last_update = key_states.shape[-2]
        return self.keys, self.values

    def held(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.shape[-2] if len(self.full_heads) else self.stream_keys.shape[-2]

    def trim(self) -> None:
        n = self.stream_keys.shape[-2]
        if n <= self.n_sink + self.window:
            return
        keep = torch.cat([torch.arange(self.n_sink), torch.arange(n - self.window, n)]).to(self.stream_keys.device)
        self.stream_keys = self.stream_keys.index_select(2, keep).contiguous()
        self.stream_values = self.stream_values.index_select(2, keep).contiguous()

    def attend(self, inner, module, query, key, value, attention_mask, **kwargs):
        heads = len(self.full_heads) + len(self.stream_heads)
        group = query.shape[1] // heads
        out = None
        for kv_idx, k, v in ((self.full_heads, self.keys, self.values), (self.stream_heads, self.stream_keys, self.stream_values)):
            if len(kv_idx) == 0:
                continue
            q_idx = (kv_idx[:, None] * group + torch.arange(group, device=kv_idx.device)).flatten()
            q = query.index_select(1, q_idx)
            o, _ = inner(module, q, k, v, fit_mask(attention_mask, q, k.shape[-2]), **kwargs)
            if out is None:
                out = o.new_empty(o.shape[0], o.shape[1], query.shape[1], o.shape[3])
            out[:, :, q_idx] = o
        return out, None

    def reset(self) -> None:
        super().reset()
        self.stream_keys = self.stream_values = None


@dataclasses.dataclass
class DuoParams(KVPressParams):
    compression_ratio: float = param(0.5, "fraction of KV heads (over all layers) turned into streaming heads (sinks + window)")
    n_sink: int = param(4, "first tokens a streaming head keeps")
    window: int = param(64, "recent tokens a streaming head keeps")
    calibration_length: int = param(1024, "tokens per synthetic passkey prompt used to find retrieval heads (capped at the model's limit)")
    calibration_episodes: int = param(8, "synthetic passkey prompts used to find retrieval heads")


class _NeedleProbe(KVPress):
    """Calibration helper: per KV head, the attention the answer positions pay to the needle."""

    name = "_needle_probe"
    Params = KVPressParams

    def __init__(self, window: int):
        super().__init__(KVPressParams(0.0))
        self._window = window
        self.span = (0, 0)
        self.totals: dict[int, torch.Tensor] = {}

    @property
    def query_window(self) -> int:  # type: ignore[override]
        return self._window

    def after_forward(self, module, layer, queries, index, cache):
        mass = attention_mass(module, queries, layer.keys) / queries.shape[2]  # [b, kv_heads, held]
        start, end = self.span
        share = mass[..., start:end].sum(-1).mean(0)  # [kv_heads]
        self.totals[index] = self.totals.get(index, 0) + share


@register
class DuoAttention(KVPress):
    name = "duo_attention"
    summary = "calibrated retrieval heads keep the full cache, the others sinks + window (memory freed per head)"
    Params = DuoParams
    decodes = True

    def __init__(self, params=None):
        super().__init__(params)
        self.retrieval: torch.Tensor | None = None

    @classmethod
    def example_params(cls) -> dict:
        return {"compression_ratio": 0.5, "window": 8, "calibration_length": 128, "calibration_episodes": 2}

    @classmethod
    def validate(cls, params, where=""):
        super().validate(params, where)
        w = prefix(where)
        check_positive(params.n_sink, w, "n_sink", minimum=0)
        check_positive(params.window, w, "window")
        check_positive(params.calibration_length, w, "calibration_length", minimum=64)
        check_positive(params.calibration_episodes, w, "calibration_episodes")

    def calibrate(self, model, context) -> RuntimeState:
        tokenizer = getattr(context, "tokenizer", None)
        if tokenizer is None:
            raise UserInputError("duo_attention calibrates on synthetic passkey prompts and needs the model's tokenizer; pass one to compress")
        from sparseforge.eval.perplexity import max_positions, model_device

        limit = max_positions(model) or self.params.calibration_length
        length = min(self.params.calibration_length, limit)
        n = self.params.calibration_episodes
        depths = [(i + 0.5) / n for i in range(n)]
        eps = episodes("passkey", tokenizer, read_text("calibration"), [length], depths, 1, seed=1234)
        device = model_device(model)
        probe = None
        was_training = model.training
        model.eval()
        try:
            for ep in eps:
                window = ep.answer_end - ep.answer_start + 1
                if probe is None:
                    probe = _NeedleProbe(window)
                    probe.attach(model)
                probe._window = window
                probe.span = ep.needle_span
                ids = torch.tensor([ep.input_ids[: ep.answer_end - 1]], device=device)
                with torch.inference_mode():
                    model(input_ids=ids, use_cache=True, logits_to_keep=1)
        finally:
            if probe is not None:
                probe.detach(model)
            model.train(was_training)
        scores = torch.stack([probe.totals[i].float().cpu() for i in sorted(probe.totals)]) / len(eps)  # [layers, kv_heads]
        n_stream = round(self.params.compression_ratio * scores.numel())
        retrieval = torch.ones(scores.numel(), dtype=torch.bool)
        if n_stream:
            retrieval[scores.flatten().argsort()[:n_stream]] = False
        retrieval = retrieval.view_as(scores)
        return RuntimeState({"retrieval_heads": retrieval}, {"needle_attention": scores.tolist(), "calibration_length": length})

    def load_state(self, state: RuntimeState) -> None:
        self.retrieval = state.tensors.get("retrieval_heads")
        if self.retrieval is None and self.params.compression_ratio > 0:
            raise UserInputError("duo_attention has no retrieval heads in its state; run calibrate() (compress does) before attach")

    def make_layer(self, old, index):
        if self.retrieval is None:
            return PressLayer.adopt(old)
        flags = self.retrieval[index].bool()
        full = flags.nonzero().flatten()
        stream = (~flags).nonzero().flatten()
        return HeadSplitLayer.adopt(old, full_heads=full, stream_heads=stream, n_sink=self.params.n_sink, window=self.params.window)

    def after_forward(self, module, layer, queries, index, cache):
        if isinstance(layer, HeadSplitLayer):
            from sparseforge.methods.kv.base import cache_bytes

            if layer.last_update > 1:  # prefill only: see KVPress.after_forward
                self.peak_cache_bytes = max(self.peak_cache_bytes, cache_bytes(cache))
            layer.trim()

    def report(self, state: RuntimeState) -> dict:
        flags = state.tensors.get("retrieval_heads")
        if flags is None:
            return super().report(state)
        return {**super().report(state), "retrieval_heads": int(flags.sum()), "kv_heads": int(flags.numel())}
