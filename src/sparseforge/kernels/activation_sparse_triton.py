"""The row-skipping product on NVIDIA GPUs, a Triton kernel in TEAL's style (Liu et al., 2024).

At batch 1 a projection on a GPU is bound by reading the weight too. The kernel splits the input dimension into
blocks of BLOCK_K channels and the output into blocks of BLOCK_N columns; each program reads its x block, decides
which of its channels are active (|x_j| > threshold_j for some token: the threshold is fused), and loads the
input-major weight `wt` [in, out] only on active rows: a masked load issues no memory transactions for masked-out
lanes, and a row's BLOCK_N columns are contiguous, so an inactive channel costs nothing and an active one is one
coalesced read. Partial sums of the programs that share output columns meet through float32 atomic adds (the
split over the input dimension, "split-K"); the result is cast to x's dtype. float16 and bfloat16 weights, 1 to 8
tokens per launch (more are cut into launches of 8). Written for this project after TEAL's description; TEAL's own
kernel is float16 and batch 1 only.

Triton is an optional dependency (`pip install 'sparseforge[gpu]'`) and is imported on first use only, so this
module is safe to import anywhere. `TRITON_INTERPRET=1` runs the same kernel on CPU tensors through Triton's
interpreter (how CI checks it where triton is installed; tests/test_activation_triton.py). The CPU reference is
`activation_sparse.reference_product`.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from sparseforge.kernels import activation_sparse as ak

DTYPES = (torch.float16, torch.bfloat16)
MAX_TOKENS = 8  # tokens per launch: each token's product is unrolled in the kernel
BLOCK_K, BLOCK_N, NUM_WARPS = 16, 256, 4  # benchmarks/activation_triton.py sweeps alternatives on the GPU


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=1)
def _kernel():
    """Define the kernel once (on first use, so that TRITON_INTERPRET set before it takes effect)."""
    import triton
    import triton.language as tl

    @triton.jit
    def row_skip(x_ptr, wt_ptr, thr_ptr, y_ptr, n_in, n_out, stride_x, stride_w, stride_y,
                 T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = offs_k < n_in
        n_ok = offs_n < n_out
        thr = tl.load(thr_ptr + offs_k, mask=k_ok, other=float("inf"))
        x0 = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        active = tl.abs(x0) > thr
        for t in tl.static_range(1, T):
            xt = tl.load(x_ptr + t * stride_x + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            active = active | (tl.abs(xt) > thr)
        # Only active rows are read from memory.
        w = tl.load(wt_ptr + offs_k[:, None] * stride_w + offs_n[None, :], mask=active[:, None] & n_ok[None, :], other=0.0)
        w = w.to(tl.float32)
        for t in tl.static_range(T):
            xt = tl.load(x_ptr + t * stride_x + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            xt = tl.where(tl.abs(xt) > thr, xt, 0.0)
            part = tl.sum(xt[:, None] * w, axis=0)
            tl.atomic_add(y_ptr + t * stride_y + offs_n, part, mask=n_ok)

    return triton, row_skip


def triton_product(x: torch.Tensor, weight_t: torch.Tensor, threshold, block_k: int = BLOCK_K, block_n: int = BLOCK_N,
                   num_warps: int = NUM_WARPS) -> torch.Tensor:
    """x [tokens, in] thresholded, times `weight_t` [in, out] (float16 or bfloat16): [tokens, out] in x's dtype.
    On CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    triton, kernel = _kernel()
    tokens, n_in = x.shape
    n_out = weight_t.shape[1]
    wt = weight_t.contiguous()
    thr = ak._as_vector(threshold, n_in, x.device)
    y = torch.zeros(tokens, n_out, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(n_in, block_k))
    for t0 in range(0, tokens, MAX_TOKENS):
        xs = x[t0:t0 + MAX_TOKENS].contiguous()
        ys = y[t0:t0 + MAX_TOKENS]
        kernel[grid](xs, wt, thr, ys, n_in, n_out, xs.stride(0), wt.stride(0), ys.stride(0),
                     T=xs.shape[0], BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps)
    return y.to(x.dtype)


@ak.register_activation_kernel
class TritonRowSkip(ak.ActivationKernel):
    name = "triton"
    summary = "Triton row-skipping product on CUDA, float16 and bfloat16, 1-8 tokens per launch (needs sparseforge[gpu])"

    def supports(self, device, dtype) -> bool:
        return torch.device(device).type == "cuda" and dtype in DTYPES and torch.cuda.is_available() and triton_available()

    def product(self, x, weight_t, threshold):
        return triton_product(x, weight_t, threshold)
