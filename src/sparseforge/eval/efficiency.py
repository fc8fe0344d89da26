"""Efficiency metrics: weight sparsity, size on disk, peak memory and prefill/decode throughput."""
from __future__ import annotations

import contextlib
import os
import pathlib
import statistics
import sys
import threading
import time
from typing import Callable, Iterable, TypeVar

import torch

from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.offload import offload_store
from sparseforge.errors import UserInputError
from sparseforge.eval.perplexity import accepts_argument, cache_argument, eval_mode, max_positions, model_device

T = TypeVar("T")


def weight_sparsity(model, targets: Iterable[str] = ("*",), ignore: Iterable[str] = ()) -> dict:
    """Fraction of exactly-zero entries in the selected projections (decoder-layer weight matrices, including
    GPT-2 Conv1D and 3-D expert stacks; embeddings, norms, biases and routers are not projections).

    Returns {"sparsity": zeros / elements over all selected projections, "sparsity_per_layer":
    {projection name: its zero fraction}, "params_targeted": elements in the selected projections}.
    """
    adapter = ModelAdapter(model)
    if not adapter.select(targets, ignore):
        raise UserInputError(
            f"no projection matches targets {list(targets)} minus ignore {list(ignore)}; "
            "check the globs against the model's projection names"
        )
    store = offload_store(model)  # disk-offloaded: read one layer at a time
    zeros = 0
    total = 0
    per_layer = {}
    for i in range(adapter.num_layers):
        with store.borrowed(i) if store is not None else contextlib.nullcontext():
            for name, proj in adapter.select(targets, ignore, layer_index=i).items():
                w = proj.weight()
                if w.numel() == 0:  # held outside the model by a runtime stage (offloaded experts): not counted here
                    continue
                n_zero = int((w == 0).sum().item())
                per_layer[name] = n_zero / w.numel()
                zeros += n_zero
                total += w.numel()
    return {"sparsity": zeros / total if total else 0.0, "sparsity_per_layer": per_layer, "params_targeted": total}


def size_on_disk(path) -> int:
    """Bytes of all regular files under `path` (or of `path` itself if it is a file); links are not followed."""
    root = pathlib.Path(path)
    if root.is_file():
        return root.stat().st_size
    if not root.is_dir():
        raise UserInputError(f"'{path}' is neither a file nor a directory; pass the saved model's directory")
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _rss_bytes() -> int:
    """Current resident set size of this process. Falls back to the lifetime peak (getrusage) where
    /proc is missing, which can only overstate the peak of a single call."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows: no way to sample without extra dependencies
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def measure_peak_memory(fn: Callable[[], T], device=None, interval_s: float = 0.001) -> tuple[T, int]:
    """Run `fn()` and return (its result, peak memory in bytes during the call).

    On CUDA (`device` is a CUDA device, or None and CUDA is available) this is the peak of memory allocated
    by PyTorch on that device (`torch.cuda.max_memory_allocated` after resetting the peak stats). On CPU it
    is the peak resident set size (RSS) of the whole process, sampled every `interval_s` by a background
    thread while `fn` runs: the process's resident peak during the call, which includes the Python runtime,
    libraries, the model's weights and anything else alive, not only the model's share.
    """
    device = torch.device(device) if device is not None else None
    use_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if use_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, int(torch.cuda.max_memory_allocated(device))

    peak = _rss_bytes()
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.wait(interval_s):
            peak = max(peak, _rss_bytes())

    sampler = threading.Thread(target=sample, name="sparseforge-rss-sampler", daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        stop.set()
        sampler.join()
    # One last sample catches memory still held when fn returned (e.g. its result).
    return result, max(peak, _rss_bytes())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed(
    model,
    tokenizer=None,
    prompt_len: int = 256,
    new_tokens: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> dict:
    """Prefill and decode throughput at batch size 1 on the model's device.

    The prompt is `prompt_len` random token ids (seeded, so runs compare like with like). Prefill is one
    forward pass over the prompt with the KV cache on (logits for the last position only, when the model
    allows it, as generation does); decode is a greedy loop of `new_tokens` steps that feeds one token at a
    time with the cache from the previous step and `use_cache=True`, after an untimed prefill. Each is run `warmup` times
    untimed, then `repeats` times; the medians are reported.

    Returns {"prefill_tokens_per_s": prompt_len / prefill median, "decode_tokens_per_s": new_tokens / decode
    median, "prefill_median_s", "decode_median_s", "prompt_len", "new_tokens", "repeats", "warmup",
    "batch_size", "device"}.
    """
    if prompt_len < 1 or new_tokens < 1 or repeats < 1 or warmup < 0:
        raise UserInputError("speed needs prompt_len >= 1, new_tokens >= 1, repeats >= 1 and warmup >= 0")
    limit = max_positions(model)
    if limit is not None and prompt_len + new_tokens > limit:
        raise UserInputError(
            f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's {limit} max positions; "
            "pass a shorter prompt or fewer new tokens"
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or (len(tokenizer) if tokenizer else None)
    if not vocab:
        raise UserInputError("cannot tell the vocabulary size for random prompts; pass the tokenizer")

    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=generator).to(device)
    last_only = {"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}

    def prefill():
        return model(input_ids=prompt, use_cache=True, **last_only)

    key = cache_argument(model)

    def decode_loop(out):
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{key: past})
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return token

    def timed(fn, *args) -> float:
        _synchronize(device)
        start = time.perf_counter()
        fn(*args)
        _synchronize(device)
        return time.perf_counter() - start

    prefill_times, decode_times = [], []
    with torch.inference_mode(), eval_mode(model):
        for i in range(warmup + repeats):
            t_prefill = timed(prefill)
            # The decode loop extends the cache in place, so each run starts from a fresh (untimed) prefill.
            t_decode = timed(decode_loop, prefill())
            if i >= warmup:
                prefill_times.append(t_prefill)
                decode_times.append(t_decode)

    prefill_s = statistics.median(prefill_times)
    decode_s = statistics.median(decode_times)
    return {
        "prefill_tokens_per_s": prompt_len / prefill_s,
        "decode_tokens_per_s": new_tokens / decode_s,
        "prefill_median_s": prefill_s,
        "decode_median_s": decode_s,
        # Run-to-run spread, (slowest - fastest) / median over the repeats: a ratio between two models closer
        # to 1 than their spreads together is not a measured difference.
        "prefill_spread": (max(prefill_times) - min(prefill_times)) / prefill_s,
        "decode_spread": (max(decode_times) - min(decode_times)) / decode_s,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "batch_size": 1,
        "device": str(device),
    }



class _AllocationTracker:
    """Counts the bytes of tensor storages that PyTorch operators create while active and that are still alive,
    and keeps the peak. A storage is counted once however many views share it and leaves the count when it is
    freed. What it sees: every operator output (activations, attention scores, new cache tensors); what it does
    not: tensors that existed before (weights, a cache passed in) and an operator's internal scratch buffers."""

    def __init__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

        def free(key):
            tracker.current -= tracker.live.pop(key, 0)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        storage = t.untyped_storage()
                        key = storage.data_ptr()
                        size = storage.nbytes()
                        if size and key not in tracker.live:
                            tracker.live[key] = size
                            tracker.current += size
                            tracker.peak = max(tracker.peak, tracker.current)
                            weakref.finalize(storage, free, key)
                return out

        self.mode = Mode()


def peak_allocated(fn: Callable[[], T], device=None) -> tuple[T, int]:
    """Run `fn()` and return (its result, peak bytes of tensors allocated during the call and alive at once).

    On CUDA: `torch.cuda.max_memory_allocated` minus the memory allocated before the call. On CPU, where PyTorch
    keeps no allocator statistics: the storages created by operators during the call, tracked through a
    `TorchDispatchMode` (see `_AllocationTracker`): exact for what it sees, deterministic, and free of the
    allocator's and the Python runtime's noise that the process RSS carries."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, int(torch.cuda.max_memory_allocated(device) - base)
    tracker = _AllocationTracker()
    with tracker.mode:
        result = fn()
    return result, tracker.peak
