"""The Triton row-skipping kernel (kernels/activation_sparse_triton.py): against the reference through Triton's CPU
interpreter where triton is installed (a subprocess, since TRITON_INTERPRET must be set before the kernel is
defined), and on a CUDA GPU where one is present; without either those tests skip, and only the registration runs."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sparseforge.kernels import activation_sparse as ak
from sparseforge.kernels import activation_sparse_triton as tk

CASES = [(dtype, tokens, sparsity) for dtype in ("float16", "bfloat16") for tokens in (1, 3, 8, 9) for sparsity in (0.0, 0.5, 0.9)]
# The interpreter runs every program instance in Python: a spread of the cases keeps that test near 20 s.
INTERPRETER_CASES = [(d, t, s) for d in ("float16", "bfloat16") for t, s in ((1, 0.5), (3, 0.9), (8, 0.0), (9, 0.5))]


def test_registered_but_never_chosen_without_cuda():
    kernel = ak.get_activation_kernel("triton")
    assert isinstance(kernel, tk.TritonRowSkip)
    assert not kernel.supports("cpu", torch.float16)
    if not torch.cuda.is_available():
        assert ak.get_activation_kernel("auto").pick("cuda", torch.float16) is None


_SCRIPT = textwrap.dedent("""
    import sys, torch
    from sparseforge.kernels import activation_sparse as ak
    from sparseforge.kernels.activation_sparse_triton import triton_product
    worst = 0.0
    for case in {cases!r}:
        dtype, tokens, sparsity = getattr(torch, case[0]), case[1], case[2]
        g = torch.Generator().manual_seed(tokens * 10 + int(sparsity * 10))
        out_f, in_f = 40, 70  # not multiples of the blocks: masked tails
        w = torch.randn(out_f, in_f, generator=g).to(dtype)
        x = torch.randn(tokens, in_f, generator=g).to(dtype)
        s = x.float().abs().flatten().sort().values
        t = float(s[int(sparsity * (s.numel() - 1))]) if sparsity else -1.0
        y = triton_product(x, w.t().contiguous(), t, block_k=16, block_n=32)
        ref = ak.reference_product(x.float(), w.float(), t)
        assert y.dtype == dtype and y.shape == (tokens, out_f), (y.dtype, y.shape)
        err = float(((y.float() - ref).abs() / (ref.abs() + 1)).max())
        worst = max(worst, err)
    print("worst", worst)
    sys.exit(0 if worst < 2e-2 else 1)
""")


@pytest.mark.skipif(not tk.triton_available(), reason="triton is not installed (pip install 'sparseforge[gpu]')")
def test_interpreter_agrees_with_reference():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", _SCRIPT.format(cases=INTERPRETER_CASES)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


@pytest.mark.skipif(not (torch.cuda.is_available() and tk.triton_available()), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("dtype, tokens, sparsity", [(getattr(torch, d), t, s) for d, t, s in CASES])
def test_cuda_agrees_with_reference(dtype, tokens, sparsity):
    g = torch.Generator().manual_seed(tokens * 10 + int(sparsity * 10))
    w = torch.randn(1000, 700, generator=g).to("cuda", dtype)
    x = torch.randn(tokens, 700, generator=g).to("cuda", dtype)
    s = x.float().abs().flatten().sort().values
    t = float(s[int(sparsity * (s.numel() - 1))]) if sparsity else -1.0
    y = tk.triton_product(x, w.t().contiguous(), t)
    ref = ak.reference_product(x.float(), w.float(), t)
    assert y.dtype == dtype and torch.allclose(y.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not (torch.cuda.is_available() and tk.triton_available()), reason="needs a CUDA GPU and triton")
def test_cuda_gate_is_keyed_by_device_and_auto_picks_triton():
    gate = ak.ActivationGate.measure([(512, 1024)], torch.float16, token_counts=[1], densities=[0.5], repeats=3, warmup=1,
                                     kernel="auto", device="cuda")
    assert list(gate.timings) == ["512x1024@float16@cuda"]
    assert ak.get_activation_kernel("auto").pick("cuda", torch.bfloat16).name == "triton"
