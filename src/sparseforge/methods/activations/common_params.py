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
    kernel: str = param("auto", "auto: the kernel for the weight's device (row-skip on CPU, triton on CUDA) wherever its speed gate measured it "
                              "faster; row-skip / triton: that one only; reference: mask then dense product", KERNEL_CHOICES)
    int8: str = param("auto", "projections whose weight is recorded 8-bit per-channel codes (gptq/rtn bits 8, group_size 0): auto skips rows "
                              "of the int8 codes (CPU); off multiplies the float weight", ("auto", "off"))
    gate_token_counts: list[int] = param([1, 2, 4, 8], "tokens per product at which the speed gate times row skipping against dense")
    gate_repeats: int = param(7, "timed calls per gate case (median kept)")
