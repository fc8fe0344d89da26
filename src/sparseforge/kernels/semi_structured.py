"""2:4 semi-structured sparse matrix products on NVIDIA GPUs (PyTorch's `to_sparse_semi_structured`,
cuSPARSELt or CUTLASS underneath), registered as the "2:4" kernel.

A 2:4 weight stores half its values plus 2-bit positions, and Ampere-or-newer tensor cores multiply it at up to
twice the dense rate, but only when the product is large enough: for a few tokens (decode) the sparse kernel's
fixed costs make it slower than the dense one, which is why `SparseLinear` asks a measured `SpeedGate`
(kernels/base.py). The dense weight stays the module's parameter (the reference path, what is saved, and the
fallback on CPU or where the gate says dense); the compressed copy lives next to it on the GPU, so memory grows
by about 0.56x of the weight rather than shrinking.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparseforge.kernels.base import SparseKernel, parse_shape, register_kernel

# PyTorch's shape rule for float16/bfloat16 semi-structured weights (the stricter of its two backends):
# rows a multiple of 32, columns a multiple of 64.
ROW_MULTIPLE, COL_MULTIPLE = 32, 64


def semi_structured_supported(device: torch.device | str | None = None) -> bool:
    """Whether this PyTorch and this device can run 2:4 sparse products (CUDA, compute capability 8.0 or newer)."""
    if not torch.cuda.is_available() or not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False
    device = torch.device(device or "cuda")
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def is_2of4(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive input weights of every row."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def random_2of4_mask(rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random boolean mask keeping 2 of every 4 consecutive entries in each row."""
    scores = torch.rand(rows, cols // 4, 4, generator=generator)
    keep = scores.argsort(-1)[..., 2:]
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
    mask.scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


@register_kernel
class SemiStructured2of4(SparseKernel):
    name = "2:4"
    summary = ("2:4 weights (at most 2 nonzeros in every 4 inputs, rows a multiple of 32 and columns of 64) in "
               "float16 or bfloat16 on a CUDA GPU of compute capability 8.0 or newer")

    def supports(self, device, dtype) -> bool:
        return dtype in (torch.float16, torch.bfloat16) and semi_structured_supported(device)

    def accepts(self, weight) -> bool:
        return is_2of4(weight) and weight.shape[0] % ROW_MULTIPLE == 0 and weight.shape[1] % COL_MULTIPLE == 0

    def example_weight(self, key, generator):
        out_f, in_f = parse_shape(key)
        return torch.randn(out_f, in_f, generator=generator) * random_2of4_mask(out_f, in_f, generator)

    def compress(self, weight):
        return torch.sparse.to_sparse_semi_structured(weight)

    def matmul(self, x, compressed):
        return F.linear(x, compressed)
