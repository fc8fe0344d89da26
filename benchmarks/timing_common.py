"""Timing helpers shared by the kernel benchmarks: alternating medians after warm-up, and a rotation over copies
of the operands so a timed call does not find its weight still in cache from the call before."""
from __future__ import annotations

import statistics
import time


def interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per variant, the variants called in turn each round (a shared machine's drift hits all alike)."""
    times = {k: [] for k in fns}
    for round_ in range(warmup + repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


class Rotation:
    """Cycles 0..n-1: which of n operand copies the next call uses."""

    def __init__(self, n: int):
        self.n, self.i = n, 0

    def next(self) -> int:
        self.i = (self.i + 1) % self.n
        return self.i
