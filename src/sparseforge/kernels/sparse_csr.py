"""Unstructured sparse products on CPU through PyTorch's CSR tensors (MKL's sparse BLAS in the official CPU
builds), registered as the "csr" kernel.

CSR keeps each nonzero's value and column plus one offset per row, so it reads about 8 bytes per kept weight
where the dense product reads 4 per weight: for one token, where both products are bound by memory, it can
only pay once well under half the weights remain. It also loses the dense kernel's vectorised inner loop,
while the dense kernel itself is weak at a few tokens, so the break-even sparsity depends on the shape and
the token count. `benchmarks/unstructured_speed.py` measures where it lies; `SparseLinear` asks a gate
measured the same way and falls back to the dense product elsewhere. Indices are int32: with torch's default
int64 a 4096x11008 product at 50% sparsity took 3.2x longer for one token
(`benchmarks/results/unstructured_ablation.md`). Float32 and float64 only: PyTorch's CPU CSR product has no
float16 or bfloat16 implementation.
"""
from __future__ import annotations

import math
import warnings

import torch

from sparseforge.kernels.base import SparseKernel, parse_shape, register_kernel

# Gate keys round the sparsity down to this step, so weights pruned to 0.50 and 0.52 share timings and a
# weight is never credited with timings from a sparser one.
SPARSITY_STEP = 0.05
# Tokens per CSR product call; see CSR.matmul.
TOKEN_CHUNK = 32


def sparsity_bucket(weight: torch.Tensor) -> float:
    zero_fraction = 1.0 - torch.count_nonzero(weight).item() / weight.numel()
    return math.floor(zero_fraction / SPARSITY_STEP + 1e-9) * SPARSITY_STEP


def to_csr(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] as a CSR tensor with int32 row offsets and column indices."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        csr = weight.to_sparse_csr()
        return torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                       csr.values(), size=csr.shape, check_invariants=False)


def random_sparse_weight(out_f: int, in_f: int, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """Random float32 weight with exactly round(sparsity * numel) zeros at uniformly random positions."""
    w = torch.randn(out_f, in_f, generator=generator)
    drop = torch.randperm(w.numel(), generator=generator)[: round(sparsity * w.numel())]
    w.view(-1)[drop] = 0.0
    return w


@register_kernel
class CSR(SparseKernel):
    name = "csr"
    summary = "any sparsity pattern, float32 or float64 weights on CPU (the product pays only at high sparsity)"

    def supports(self, device, dtype) -> bool:
        return torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float64)

    def accepts(self, weight) -> bool:
        return weight.dim() == 2 and weight.numel() < 2**31  # int32 indices

    def key(self, weight) -> str:
        return f"{weight.shape[0]}x{weight.shape[1]}@{sparsity_bucket(weight):.2f}"

    def example_weight(self, key, generator):
        out_f, in_f = parse_shape(key)
        sparsity = float(key.split("@")[1]) if "@" in key else 0.0
        return random_sparse_weight(out_f, in_f, sparsity, generator)

    def compress(self, weight):
        return to_csr(weight)

    def matmul(self, x, compressed):
        # (W xᵀ)ᵀ: the CSR product takes the sparse operand on the left. Each nonzero W[r, c] reads row c of xᵀ,
        # in random order, so xᵀ must stay in cache: TOKEN_CHUNK tokens at a time (one call for 512 tokens took 3.3x
        # longer at 50% sparsity and 1.8x at 90% on a 4096x11008 weight, benchmarks/results/unstructured_ablation.md).
        if x.shape[0] <= TOKEN_CHUNK:
            return torch.sparse.mm(compressed, x.t().contiguous()).t()
        return torch.cat([torch.sparse.mm(compressed, part.t().contiguous()) for part in x.split(TOKEN_CHUNK)], dim=1).t()
