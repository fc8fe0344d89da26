"""Helpers shared by the KV-cache benchmarks (kvpress_compare.py, kv_scale.py, kv_quality.py).

This module imports only torch and transformers at call time, never sparseforge, because the kvpress
comparison runs parts of these scripts under kvpress's own environment (its own transformers version).

Memory on CPU is the process's resident set: each cell runs in a fresh subprocess, the peak counter (VmHWM in
/proc/self/status) is reset by writing "5" to /proc/self/clear_refs right before the phase being measured,
and the phase's peak is VmHWM read right after it, minus the resident size when the counter was reset. The
subprocess runs with MALLOC_MMAP_THRESHOLD_=65536 so that glibc serves every large tensor from its own
mapping and returns it to the system when freed; without it, freed heap stays resident and the next phase
could reuse it without raising the counter.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
REFERENCE_MODEL = HERE.parent / "src" / "sparseforge" / "assets" / "reference-model"
CELL_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# ------------------------------------------------------------------------------------------------ machine

def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(threads: int | None = None) -> dict:
    """Where the numbers were measured: CPU model and cores, torch/transformers versions, torch threads."""
    import torch
    import transformers

    return {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0],
            "platform": platform.platform(), "torch_threads": threads if threads is not None else torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def machine_line(env: dict) -> str:
    return (f"{env['cpu']} ({env['cpu_count']} cores, shared with other jobs), {env['device']}, torch {env['torch']}, "
            f"transformers {env['transformers']}, {env['torch_threads']} torch thread(s)")


# ------------------------------------------------------------------------------------------------ memory

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak() -> int:
    """Reset the peak-RSS counter to the current resident size; returns that size in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


class Phase:
    """`with Phase() as p: work()` -> p.seconds, p.peak (bytes resident at the peak), p.delta (peak minus the
    resident size at the start)."""

    def __enter__(self):
        import gc

        gc.collect()
        self.start_rss = reset_peak()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak = peak_bytes()
        self.delta = self.peak - self.start_rss
        return False


class CudaPhase:
    """Phase's counterpart on a GPU: p.peak is torch.cuda.max_memory_allocated during the phase (reset at its
    start), p.delta the peak minus what was allocated at its start, p.start_rss what was allocated at its start
    (named like Phase's so the tables need no second schema)."""

    def __enter__(self):
        import gc

        import torch

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start_rss = torch.cuda.memory_allocated()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.peak = torch.cuda.max_memory_allocated()
        self.delta = self.peak - self.start_rss
        return False


def tensor_bytes(obj, seen=None) -> int:
    """Exact bytes of every distinct tensor reachable from a cache object's layers (keys, values, packed codes,
    scales, residual windows): the generic count for caches that are not sparseforge's own."""
    import torch

    seen = set() if seen is None else seen
    total = 0
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.untyped_storage().nbytes()) if x.numel() else None
            if key is not None and key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif hasattr(x, "__dict__") and not isinstance(x, type) and not callable(x):
            stack.extend(v for v in vars(x).values())
    return total


def cache_tokens(cache) -> list[int]:
    """Tokens held per layer (the key tensor's sequence length) of a transformers cache."""
    return [int(layer.keys.shape[-2]) if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 else -1
            for layer in cache.layers]


# ------------------------------------------------------------------------------------------------ running

def run_cell(python: str, script: pathlib.Path, spec: dict, timeout: float | None = None) -> dict:
    """Run `script --cell SPEC` in a fresh interpreter; the cell prints one JSON object as its last line."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | CELL_ENV
    env["OMP_NUM_THREADS"] = str(spec.get("threads", 1))
    start = time.perf_counter()
    try:
        proc = subprocess.run([python, str(script), "--cell", json.dumps(spec)], env=env, capture_output=True,
                              text=True, timeout=timeout, cwd=str(HERE))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [l for l in proc.stdout.strip().splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)[-600:]}", "wall_s": round(time.perf_counter() - start, 1)}
    out = json.loads(lines[-1])
    out["wall_s"] = round(time.perf_counter() - start, 1)
    return out


def write(name: str, doc: dict, md: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / f".{name}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(RESULTS / f"{name}.json")
    (RESULTS / f"{name}.md").write_text(md)


def mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"
