"""The six EfficientLLM metrics, measured on the machine at hand: memory (prefill and decode apart), compute
utilization, latency (TTFT, TPOT, by context length), throughput (batch 1 and a batch chosen by memory), energy
and the bytes that compression rates are computed from. Nothing here is estimated: what this machine cannot
measure (energy without RAPL or NVML) is reported as unavailable, with the reason."""
from __future__ import annotations

import glob
import math
import os
import statistics
import time

import torch

from sparseforge.eval.kv import kv_efficiency
from sparseforge.eval.perplexity import accepts_argument, cache_argument, eval_mode, max_positions, model_device

# Fraction of the memory still available that a batch may take when the throughput batch is chosen.
BATCH_MEMORY_FRACTION = 0.5


# ----------------------------------------------------------------------------------------------- energy


class EnergyMeter:
    """Cumulative energy counters of this machine: Intel/AMD RAPL package domains under /sys/class/powercap on
    CPU, NVML's total energy of the GPU on CUDA. `source` names what is read, or says why nothing can be
    ("unavailable: ..."); `read()` gives joules since an arbitrary origin, or None when unavailable."""

    def __init__(self, device: torch.device | None = None, root: str = "/sys/class/powercap"):
        self.device = torch.device(device or "cpu")
        self._domains: list[tuple[str, int]] = []
        self._nvml = None
        self.source = self._probe(root)

    def _probe(self, root: str) -> str:
        if self.device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                self._nvml = (pynvml, handle)
                return "nvml:total_energy_consumption"
            except Exception as exc:  # no pynvml, no driver support: say so
                return f"unavailable: NVML energy counter not readable ({type(exc).__name__})"
        # Package domains only (intel-rapl:N); their subdomains (core, uncore, dram) are parts of the same total.
        paths = sorted(p for p in glob.glob(os.path.join(root, "intel-rapl:*")) if p.count(":") == 1)
        if not paths:
            return f"unavailable: no RAPL domains under {root}"
        names = []
        for path in paths:
            try:
                with open(os.path.join(path, "energy_uj")) as f:
                    int(f.read())
                with open(os.path.join(path, "max_energy_range_uj")) as f:
                    wrap = int(f.read())
                with open(os.path.join(path, "name")) as f:
                    names.append(f.read().strip())
            except (OSError, ValueError) as exc:
                return f"unavailable: RAPL counter {path} not readable ({type(exc).__name__}; reading it usually needs root)"
            self._domains.append((path, wrap))
        return "rapl:" + "+".join(names)

    @property
    def available(self) -> bool:
        return bool(self._domains) or self._nvml is not None

    def _raw(self) -> list[int]:
        if self._nvml is not None:
            pynvml, handle = self._nvml
            return [int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)) * 1000]  # mJ -> uJ
        out = []
        for path, _ in self._domains:
            with open(os.path.join(path, "energy_uj")) as f:
                out.append(int(f.read()))
        return out

    def measure(self, fn) -> tuple[object, float | None]:
        """(fn(), joules the machine used meanwhile), or (fn(), None) when unavailable. RAPL counters wrap at
        max_energy_range_uj; a single wrap per call is undone."""
        if not self.available:
            return fn(), None
        before = self._raw()
        result = fn()
        after = self._raw()
        total = 0
        for i, (a, b) in enumerate(zip(before, after)):
            delta = b - a
            if delta < 0 and self._domains:
                delta += self._domains[i][1]
            total += delta
        return result, total / 1e6


# ----------------------------------------------------------------------------------------------- compute


def matmul_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """The dense matmul FLOP/s this machine reaches now: the best of `repeats` timed `n x n @ n x n` products in
    `dtype` with the current torch thread count, after one warm-up. Measured at every call (about 0.1 s on a
    CPU core), right beside the timing it divides: on a shared machine the peak available moves with the load,
    and a peak measured once at start-up gave utilizations above 1 later in a sweep."""
    device = torch.device(device)
    if device.type == "cpu" and dtype in (torch.float16,):
        dtype = torch.float32  # CPU half matmuls are emulated; the model would not run them either
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    best = math.inf
    with torch.inference_mode():
        for i in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            if i:
                best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def forward_flops(fn) -> tuple[object, int]:
    """(fn(), the FLOPs torch's FlopCounterMode counts for its operators). A sparse or quantized model's matmuls
    count as dense ones of the same shape (the zeros are multiplied), so the figure is dense-equivalent."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        result = fn()
    return result, int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_memory_bytes(model) -> int:
    """Exact bytes of the model's parameters and buffers in memory, each storage once (tied weights, views and
    packed codes included): the in-memory side of a compression rate."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta" or not t.numel():
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _total_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _Runner:
    """Greedy prefill and decode through the KV cache (whatever KV stage is attached acts), timed."""

    def __init__(self, model):
        self.model = model
        self.device = model_device(model)
        self.key = cache_argument(model)
        self.last_only = {"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}

    def prefill(self, ids: torch.Tensor):
        out = self.model(input_ids=ids, use_cache=True, **self.last_only)
        return out.past_key_values, out.logits[:, -1:].argmax(-1)

    def decode(self, cache, token, steps: int):
        for _ in range(steps):
            out = self.model(input_ids=token, use_cache=True, **{self.key: cache})
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return cache, token

    def timed(self, fn, *args):
        _sync(self.device)
        start = time.perf_counter()
        result = fn(*args)
        _sync(self.device)
        return result, time.perf_counter() - start

    def latency(self, ids: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, float]:
        """Medians over `repeats` (after one warm-up) of TTFT (prompt in, first token out) and TPOT (seconds per
        further token over `new_tokens - 1` steps)."""
        ttfts, tpots = [], []
        for i in range(repeats + 1):
            (cache, token), ttft = self.timed(self.prefill, ids)
            _, decode_s = self.timed(self.decode, cache, token, max(1, new_tokens - 1))
            if i:
                ttfts.append(ttft)
                tpots.append(decode_s / max(1, new_tokens - 1))
        return statistics.median(ttfts), statistics.median(tpots)


def _prompt(vocab: int, batch: int, length: int, device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


def default_lengths(limit: int | None, new_tokens: int) -> list[int]:
    """Context lengths of the latency table: 128, 512, 2048 and the model's longest, those that fit."""
    top = (limit or 2048) - new_tokens
    lengths = [L for L in (128, 512, 2048) if L <= top]
    if limit and top > 0 and top not in lengths and top < 2048:
        lengths.append(top)
    return sorted(set(lengths)) or [max(1, top)]


# ----------------------------------------------------------------------------------------------- the task


def efficiency_metrics(model, tokenizer=None, prompt_len: int | None = None, new_tokens: int = 16, lengths=None,
                       repeats: int = 3, max_batch: int = 8, seed: int = 0) -> dict:
    """The EfficientLLM metrics of `model` as it runs now (runtime stages attached), at batch 1 on a seeded
    random prompt of `prompt_len` tokens (default min(512, max positions - new_tokens)):

    * memory: `mem_prefill_peak_bytes` / `mem_decode_peak_bytes` (tensors alive at once, see `kv_efficiency`),
      their sampled RSS counterparts, `model_memory_bytes` (exact parameter and buffer bytes) and
      `memory_utilization` (decode-phase peak RSS, or CUDA peak, over the device's total memory);
    * compute: `compute_prefill_flops` (FlopCounterMode, dense-equivalent), `compute_achieved_flops_per_s` (those
      FLOPs over the median TTFT), `compute_peak_flops_per_s` (measured dense matmul of this machine) and
      `compute_utilization` (their ratio);
    * latency: `latency_ttft_s`, `latency_tpot_s` and `latency_by_length` {length: {ttft_s, tpot_s}};
    * throughput: `throughput_batch1_tokens_per_s` (decode, 1 / TPOT) and `throughput_batch_tokens_per_s` at
      `throughput_batch`, the largest power of two <= max_batch whose decode memory (batch-1 decode peak per
      sequence) fits in half the memory available now;
    * energy: `energy_source` and `energy_prefill_joules` / `energy_decode_joules_per_token` (None when the
      source is unavailable);
    * `efficiency_*`: the settings.
    """
    device = model_device(model)
    limit = max_positions(model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
    if prompt_len is None:
        prompt_len = min(512, (limit or 512 + new_tokens) - new_tokens)
    lengths = sorted(set(int(L) for L in lengths)) if lengths else default_lengths(limit, new_tokens)
    from sparseforge.errors import UserInputError

    for L in [prompt_len, *lengths]:
        if L < 1 or (limit and L + new_tokens > limit):
            raise UserInputError(f"efficiency: context length {L} + {new_tokens} new tokens does not fit the model's "
                                 f"{limit} positions; pass shorter efficiency lengths")
    if new_tokens < 2 or repeats < 1 or max_batch < 1:
        raise UserInputError("efficiency needs new_tokens >= 2, repeats >= 1 and max_batch >= 1")
    runner = _Runner(model)
    ids = _prompt(vocab, 1, prompt_len, device, seed)
    meter = EnergyMeter(device)
    metrics: dict = {}
    with torch.inference_mode(), eval_mode(model):
        memory = kv_efficiency(model, ids, new_tokens)
        _, flops = forward_flops(lambda: runner.prefill(ids))
        peak = matmul_peak_flops(device, next(model.parameters()).dtype)
        ttft, tpot = runner.latency(ids, new_tokens, repeats)
        by_length = {}
        for L in lengths:
            t, p = runner.latency(_prompt(vocab, 1, L, device, seed), new_tokens, repeats)
            by_length[str(L)] = {"ttft_s": t, "tpot_s": p}
        (cache, token), prefill_j = meter.measure(lambda: runner.prefill(ids))
        _, decode_j = meter.measure(lambda: runner.decode(cache, token, new_tokens - 1))
        per_sequence = max(1, memory["kv_decode_peak_bytes"])
        from sparseforge.core.calibration import available_memory_bytes

        free = available_memory_bytes(device) or 0
        fits = int(free * BATCH_MEMORY_FRACTION // per_sequence)
        batch = 1
        while batch * 2 <= min(max_batch, max(1, fits)):
            batch *= 2
        batched = _prompt(vocab, batch, prompt_len, device, seed)
        runner.decode(*runner.prefill(batched), 1)  # warm-up at this batch size
        cache, token = runner.prefill(batched)
        _, batch_s = runner.timed(runner.decode, cache, token, new_tokens - 1)
    total = _total_memory(device)
    decode_rss = memory["kv_decode_peak_rss_bytes"]
    metrics.update({
        "mem_prefill_peak_bytes": memory["kv_prefill_peak_bytes"],
        "mem_decode_peak_bytes": memory["kv_decode_peak_bytes"],
        "mem_prefill_peak_rss_bytes": memory["kv_prefill_peak_rss_bytes"],
        "mem_decode_peak_rss_bytes": decode_rss,
        "mem_kv_cache_bytes": memory["kv_cache_bytes"],
        "mem_kv_cache_full_bytes": memory["kv_cache_full_bytes"],
        "model_memory_bytes": model_memory_bytes(model),
        "memory_utilization": decode_rss / total if total else None,
        "compute_prefill_flops": flops,
        "compute_achieved_flops_per_s": flops / ttft,
        "compute_peak_flops_per_s": peak,
        "compute_utilization": flops / ttft / peak,
        "latency_ttft_s": ttft,
        "latency_tpot_s": tpot,
        "latency_by_length": by_length,
        "throughput_batch1_tokens_per_s": 1.0 / tpot,
        "throughput_batch": batch,
        "throughput_batch_tokens_per_s": batch * (new_tokens - 1) / batch_s,
        "energy_source": meter.source,
        "energy_prefill_joules": prefill_j,
        "energy_decode_joules_per_token": decode_j / (new_tokens - 1) if decode_j is not None else None,
        "efficiency_prompt_len": prompt_len,
        "efficiency_new_tokens": new_tokens,
        "efficiency_repeats": repeats,
        "efficiency_device": str(device),
        "efficiency_threads": torch.get_num_threads(),
    })
    return metrics
