"""Parameters every activation method shares (prefill treatment, kernel, speed gate), as dataclass fields that
each method's Params repeats by inheritance, so `sparseforge methods` lists them per method."""
from __future__ import annotations

import dataclasses

from sparseforge.methods.activations.base import KERNEL_CHOICES, PREFILL_MODES
from sparseforge.methods.base import param


@dataclasses.dataclass
class RuntimeParams:
    prefill: str = param("sparse", "prompt forwards: sparse (every token thresholded), dense (only decode steps sparse) or partial", PREFILL_MODES)
    prefill_dense_tokens: int = param(64, "with prefill: partial, the first this many positions of a prompt stay dense")
    kernel: str = param("row-skip", "row-skip: the CPU kernel wherever its speed gate measured it faster; reference: mask then dense product", KERNEL_CHOICES)
    gate_token_counts: list[int] = param([1, 2, 4, 8], "tokens per product at which the speed gate times row skipping against dense")
    gate_repeats: int = param(7, "timed calls per gate case (median kept)")
