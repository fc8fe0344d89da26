"""Evaluation through the KV cache: perplexity with the cache compressed as it fills (`kv_perplexity`), and the
memory and time of prefill and decode with whatever KV stage is attached (`kv_efficiency`)."""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F

from sparseforge.errors import UserInputError
from sparseforge.eval.efficiency import measure_peak_memory, peak_allocated
from sparseforge.eval.perplexity import accepts_argument, cache_argument, encode, eval_mode, max_positions, model_device


def _press(model):
    from sparseforge.methods.kv.base import attached_press

    return attached_press(model)


def _cache_bytes(cache) -> int:
    from sparseforge.methods.kv.base import cache_bytes

    return cache_bytes(cache)


def kv_perplexity(model, tokenizer, text: str, chunk: int = 256, max_tokens: int | None = None) -> dict:
    """Perplexity of the text fed `chunk` tokens at a time through the KV cache; with a KV press attached, the
    cache is compressed after every chunk to the press's ratio of all tokens so far, so each chunk's tokens are
    predicted from the compressed cache of everything before plus the chunk itself. Every token but the first is
    scored once (a chunk's first token by the previous chunk's last logits). Without a press this equals plain
    full-context perplexity over the first `max_tokens` tokens (default: the model's max positions, at most 2048).

    Returns {"kv_perplexity", "kv_perplexity_tokens_scored", "kv_perplexity_chunk", "kv_perplexity_peak_cache_bytes"}."""
    if chunk < 1:
        raise UserInputError(f"kv_perplexity chunk must be a positive number of tokens, got {chunk}")
    limit = max_positions(model)
    cap = max_tokens if max_tokens is not None else min(limit or 2048, 2048)
    if limit is not None and cap > limit:
        raise UserInputError(f"kv_perplexity max_tokens {cap} exceeds the model's {limit} max positions; pass at most {limit}")
    ids = encode(tokenizer, text, cap)
    if len(ids) < 2:
        raise UserInputError("the text has fewer than 2 tokens, so there is nothing to score; pass a longer text")
    device = model_device(model)
    all_ids = torch.tensor([ids], dtype=torch.long, device=device)
    press = _press(model)
    if press is not None:
        press.peak_cache_bytes = 0  # the press's own record, which earlier runs (retrieval) also raised
    schedule = press.schedule(every_forward=True) if press is not None else contextlib.nullcontext()
    key = cache_argument(model)
    nll, scored, cache, carry, peak = 0.0, 0, None, None, 0
    with torch.inference_mode(), eval_mode(model), schedule:
        for start in range(0, len(ids), chunk):
            piece = all_ids[:, start : start + chunk]
            out = model(input_ids=piece, use_cache=True, **{key: cache})
            cache = out.past_key_values
            peak = max(peak, _cache_bytes(cache), getattr(press, "peak_cache_bytes", 0))
            logits = out.logits[0].float()
            if carry is not None:
                logits = torch.cat([carry, logits])
                targets = piece[0]
            else:
                targets = piece[0, 1:]
            carry = logits[-1:]
            logp = F.log_softmax(logits[: len(targets)], dim=-1)
            nll -= logp.gather(-1, targets[:, None]).double().sum().item()
            scored += len(targets)
    return {
        "kv_perplexity": math.exp(nll / scored),
        "kv_perplexity_tokens_scored": scored,
        "kv_perplexity_chunk": chunk,
        "kv_perplexity_peak_cache_bytes": peak,
    }


def kv_efficiency(model, input_ids: torch.Tensor, new_tokens: int = 32, chunk_size: int | None = None) -> dict:
    """Prefill `input_ids` (in chunks of `chunk_size` if given) and decode `new_tokens` greedily, through the
    attached KV stage if any, measuring the two phases apart:

    * `kv_prefill_peak_bytes` / `kv_decode_peak_bytes`: peak bytes allocated during the phase (CUDA:
      max_memory_allocated above the start; CPU: operator outputs alive at once, see `peak_allocated`), for
      decode plus the cache it starts from (what decoding holds beyond the weights);
    * `kv_prefill_peak_rss_bytes` / `kv_decode_peak_rss_bytes`: the process's sampled peak resident memory during
      the phase (CPU; includes weights, runtime and allocator caching; on CUDA the device peak instead);
    * `kv_cache_peak_bytes`: the cache's own bytes at their peak (inside a forward, before a layer is compressed),
      `kv_cache_bytes` after decoding and `kv_cache_full_bytes` uncompressed;
    * `kv_ttft_s` (prompt in -> first token) and `kv_tpot_s` (mean seconds per further token).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if new_tokens < 1:
        raise UserInputError(f"kv_efficiency needs new_tokens >= 1, got {new_tokens}")
    from sparseforge.methods.kv.base import full_cache_bytes

    device = model_device(model)
    input_ids = input_ids.to(device)
    press = _press(model)
    if press is not None:
        press.peak_cache_bytes = 0
    if chunk_size is not None and press is not None and not press.chunks:
        raise UserInputError(f"KV stage '{press.name}' does not support chunked prefill; unset the chunk size")
    key = cache_argument(model)
    last_only = {"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}
    n = input_ids.shape[1]
    state: dict = {}

    def prefill():
        chunks = [input_ids] if chunk_size is None else list(input_ids.split(chunk_size, dim=1))
        schedule = press.schedule(prompt_len=n) if (press is not None and chunk_size is not None) else contextlib.nullcontext()
        cache = None
        start = time.perf_counter()
        with schedule:
            for piece in chunks:
                out = model(input_ids=piece, use_cache=True, **last_only, **{key: cache})
                cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        state.update(cache=cache, token=token, ttft=time.perf_counter() - start)

    def decode():
        cache, token, steps = state["cache"], state["token"], []
        for _ in range(new_tokens - 1):
            t0 = time.perf_counter()
            out = model(input_ids=token, use_cache=True, **{key: cache})
            token = out.logits[:, -1:].argmax(-1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            steps.append(time.perf_counter() - t0)
        state["steps"] = steps

    with torch.inference_mode(), eval_mode(model):
        # Timed run first (tracking slows operators down), then a tracked run of each phase.
        prefill()
        decode()
        ttft, steps = state["ttft"], state["steps"]
        (_, prefill_peak), prefill_rss = measure_peak_memory(lambda: peak_allocated(prefill, device), device=device)
        cache_peak = getattr(press, "peak_cache_bytes", 0)
        start_cache = _cache_bytes(state["cache"])
        (_, decode_alloc), decode_rss = measure_peak_memory(lambda: peak_allocated(decode, device), device=device)
    cache = state["cache"]
    return {
        "kv_prefill_peak_bytes": prefill_peak,
        "kv_decode_peak_bytes": start_cache + decode_alloc,
        "kv_prefill_peak_rss_bytes": prefill_rss,
        "kv_decode_peak_rss_bytes": decode_rss,
        "kv_cache_peak_bytes": max(cache_peak, start_cache, _cache_bytes(cache)),
        "kv_cache_bytes": _cache_bytes(cache),
        "kv_cache_full_bytes": full_cache_bytes(cache),
        "kv_ttft_s": ttft,
        "kv_tpot_s": sum(steps) / len(steps) if steps else None,
        "kv_prompt_len": n,
        "kv_new_tokens": new_tokens,
        "kv_chunk_size": chunk_size,
        "kv_stage": press.name if press is not None else None,
        "kv_device": str(device),
    }
