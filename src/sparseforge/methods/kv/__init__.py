"""KV-cache compression: presses that evict cached tokens, a head-level press, and a quantized (KIVI) cache.

Stable API (used by the benchmarks, `sparseforge generate` and eval):

    from sparseforge.methods import get_method
    press = get_method("snapkv")(get_method("snapkv").parse_params({"compression_ratio": 0.75}))
    state = press.calibrate(model, context)      # RuntimeState; only duo_attention calibrates
    press.attach(model, state)                   # hooks on the adapter's attention modules
    model.generate(...) / model(...)             # the prompt's prefill is compressed, decoding keeps the budget
    press.detach(model)                          # outputs bit-identical to before attach

    from sparseforge.methods.kv import generate_with_press, cache_bytes, attached_press
    r = generate_with_press(model, input_ids, press, max_new_tokens=32, chunk_size=None)
    #  -> GenerationResult(tokens, ttft_s, tpot_s, peak_cache_bytes, final_cache_bytes, full_cache_bytes,
    #                      prompt_len, chunk_size, cache); .to_json() drops the cache
    #  chunk_size=C: prefill C tokens at a time, compressing to the prompt's budget after each chunk
    cache_bytes(cache) -> int                    # exact bytes of every tensor the Cache holds
    full_cache_bytes(cache, dtype=None) -> int   # what the same tokens take uncompressed (dtype: e.g. float16)
    press.peak_cache_bytes                       # cache bytes at their peak inside prefill forwards (reset it)
    attached_press(model) -> KVPress | None

    with press.schedule(every_forward=True): ...  # compress every multi-token forward (kv_perplexity)
    with press.schedule(prompt_len=N): ...        # compress every forward to an N-token prompt's budget

Registered methods (family "kv", lifetime "runtime"): streaming_llm, knorm, snapkv, pyramidkv, tova, h2o,
duo_attention, kivi. Every press takes `compression_ratio` (fraction of cached tokens removed, in [0, 1), kvpress's
convention) except kivi, whose parameters are bits, group_size and residual_length (plus an optional MiKV press).
Which press supports chunked prefill and decode-time compression: `KVPress.chunks` / `KVPress.decodes`, and the
table in docs/methods/kv.md.
"""
from sparseforge.methods.kv import duo_attention, h2o, kivi, knorm, pyramidkv, snapkv, streaming_llm, tova  # noqa: F401
from sparseforge.methods.kv.base import KVPress, PressLayer, attached_press, cache_bytes, full_cache_bytes
from sparseforge.methods.kv.prefill import GenerationResult, generate_with_press

__all__ = [
    "KVPress",
    "PressLayer",
    "attached_press",
    "cache_bytes",
    "full_cache_bytes",
    "generate_with_press",
    "GenerationResult",
]
