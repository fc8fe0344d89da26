"""Chunked prefill and decoding through a pressed cache.

`generate_with_press` prefills the prompt `chunk_size` tokens at a time. With a press, every chunk's forward
compresses each layer right after its attention to the budget of the whole prompt (`press.target(layer, N)`),
scoring the chunk's queries against what the compressed cache already holds plus the chunk, so the cache never
holds more than budget + one chunk per layer, whatever the prompt length (kvpress prefills the whole prompt first
and prunes after, so its prefill peak grows with the prompt). Decoding then keeps the cache at that budget for
presses with `decodes` (StreamingLLM, H2O, TOVA, key-norm, DuoAttention); the others let it grow by one token a
step. Greedy decoding, batch size 1 (or unpadded batches).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from sparseforge.errors import UserInputError
from sparseforge.methods.base import RuntimeState
from sparseforge.methods.kv.base import KVPress, attached_press, cache_argument, cache_bytes, full_cache_bytes


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per batch row (the prompt not included)
    ttft_s: float  # prompt in -> first token out, all chunks included
    tpot_s: float | None  # mean seconds per further output token (None when only one was generated)
    peak_cache_bytes: int  # the cache's own bytes at their peak (inside a forward, before a layer is compressed)
    final_cache_bytes: int
    full_cache_bytes: int  # what the final cache would hold uncompressed, in its own dtype
    prompt_len: int
    chunk_size: int | None
    cache: object = dataclasses.field(default=None, repr=False)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("cache")
        return d


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_with_press(
    model,
    input_ids: torch.Tensor,
    press: KVPress | None = None,
    max_new_tokens: int = 32,
    chunk_size: int | None = None,
    state: RuntimeState | None = None,
    eos_token_id: int | None = None,
) -> GenerationResult:
    """Greedy generation with the KV cache compressed by `press` (None: the press already attached, or none).

    A press that is not attached yet is attached for the call and detached after it. `chunk_size` None prefills
    the prompt in one forward (compressed after it, as kvpress does); an integer prefills it in chunks of that many
    tokens, compressing after each. Returns a `GenerationResult` with TTFT, TPOT and the cache's peak bytes."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    n = input_ids.shape[1]
    if n < 1 or max_new_tokens < 1:
        raise UserInputError("generate_with_press needs a non-empty prompt and max_new_tokens >= 1")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise UserInputError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if press is not None and chunk_size is not None and not press.chunks:
        raise UserInputError(f"press '{press.name}' does not support chunked prefill; pass chunk_size=None")
    owned = press is not None and attached_press(model) is not press
    if owned:
        press.attach(model, state)
    active = press if press is not None else attached_press(model)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    keep_last = {"logits_to_keep": 1}
    key = cache_argument(model)
    peak = 0
    try:
        if active is not None:
            active.peak_cache_bytes = 0
        with torch.inference_mode():
            _sync(device)
            start = time.perf_counter()
            cache = None
            chunks = [input_ids] if chunk_size is None else list(input_ids.split(chunk_size, dim=1))
            schedule = (
                active.schedule(prompt_len=n) if (active is not None and chunk_size is not None) else contextlib.nullcontext()
            )
            with schedule:
                for chunk in chunks:
                    out = model(input_ids=chunk, use_cache=True, **{key: cache}, **keep_last)
                    cache = out.past_key_values
                    peak = max(peak, cache_bytes(cache))
            token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            ttft = time.perf_counter() - start
            generated = [token]
            steps = []
            for _ in range(max_new_tokens - 1):
                if eos_token_id is not None and bool((token == eos_token_id).all()):
                    break
                t0 = time.perf_counter()
                out = model(input_ids=token, use_cache=True, **{key: cache})
                cache = out.past_key_values
                token = out.logits[:, -1:].argmax(-1)
                _sync(device)
                steps.append(time.perf_counter() - t0)
                peak = max(peak, cache_bytes(cache))
                generated.append(token)
        if active is not None:
            peak = max(peak, active.peak_cache_bytes)
        tokens = torch.cat(generated, dim=1).tolist()
        return GenerationResult(
            tokens, ttft, sum(steps) / len(steps) if steps else None, peak, cache_bytes(cache), full_cache_bytes(cache),
            n, chunk_size, cache,
        )
    finally:
        if owned:
            press.detach(model)
