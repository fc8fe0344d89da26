"""The row-skipping CPU kernel against its reference (mask, then the dense product) on random inputs at 0-95%
activation sparsity, float32 and bfloat16, batch 1-8, scalar and per-channel thresholds; the speed gate's
choices; and the fallback to the reference path, announced once, when the kernel cannot be built."""
from __future__ import annotations

import logging

import pytest
import torch

from sparseforge.kernels import activation_sparse as ak
from sparseforge.methods.activations.base import ActivationSparseLinear

pytestmark = pytest.mark.skipif(not ak.available(), reason="no C++ compiler: the reference path is tested elsewhere")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 3, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.8, 0.95])
def test_row_skip_agrees_with_reference(dtype, tokens, sparsity):
    g = torch.Generator().manual_seed(int(sparsity * 100) + tokens)
    out_f, in_f = 72, 203  # not multiples of the kernel's 4-row groups or cache lines: tails are exercised
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    x = torch.randn(tokens, in_f, generator=g).to(dtype)
    # A per-channel threshold vector at the requested sparsity (what WINA uses), and a scalar one (TEAL).
    scale = torch.rand(in_f, generator=g) + 0.5
    score = (x.float().abs() * scale).flatten().sort().values
    t_score = float(score[min(int(sparsity * score.numel()), score.numel() - 1)]) if sparsity else -1.0
    for threshold in (torch.full((in_f,), t_score) / scale, torch.tensor(float(x.float().abs().flatten().sort().values[int(sparsity * (x.numel() - 1))]) if sparsity else -1.0)):
        y, rows, kept = ak.row_skip_product(x, w.t().contiguous(), threshold)
        # The reference in float32 on the same (bfloat16-valued) inputs: the kernel accumulates in float32 and
        # rounds once, so a bfloat16 result is within half a bfloat16 step of it.
        ref = ak.reference_product(x.float(), w.float(), threshold)
        assert y.dtype == dtype and y.shape == (tokens, out_f)
        keep = x.float().abs() > threshold.float()
        assert kept == int(keep.sum()) and rows == int(keep.any(0).sum())
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=2 ** -8)
        assert torch.allclose(y.float(), ref.float(), **tol), (y.float() - ref.float()).abs().max()


def test_all_inactive_gives_zeros_and_exact_zero_is_skipped():
    w = torch.randn(8, 16)
    x = torch.zeros(2, 16)
    y, rows, kept = ak.row_skip_product(x, w.t().contiguous(), 0.0)
    assert torch.equal(y, torch.zeros(2, 8)) and rows == 0 and kept == 0


def test_gate_choices():
    key = ak.gate_key(64, 128, torch.float32)
    gate = ak.ActivationGate({key: {1: {0.5: {"dense_s": 1.0, "sparse_s": 0.5}, 0.8: {"dense_s": 1.0, "sparse_s": 0.99}},
                                    4: {0.5: {"dense_s": 1.0, "sparse_s": 1.2}}}}, margin=0.05)
    assert gate.choose(key, 1, 0.45) == "sparse"  # density rounds up to the 0.5 timing
    assert gate.choose(key, 1, 0.55) == "dense"  # the 0.8 timing: not faster by the margin
    assert gate.choose(key, 1, 0.9) == "dense"  # denser than anything measured
    assert gate.choose(key, 2, 0.5) == "dense"  # tokens 2 use the 4-token timing, where dense won
    assert gate.choose(key, 16, 0.1) == "dense"  # more tokens than measured: never extrapolated
    assert gate.choose("1x1@float32", 1, 0.1) == "dense"  # unknown shape
    assert ak.ActivationGate.from_dict(gate.to_dict()) == gate
    assert ak.density_bucket(0.41) == pytest.approx(0.5) and ak.density_bucket(0.4) == pytest.approx(0.4)


def test_measured_gate_never_picks_the_slower_path():
    gate = ak.ActivationGate.measure([(256, 512)], torch.float32, token_counts=[1, 8], densities=[0.2, 1.0], repeats=3, warmup=1)
    for key, per_tokens in gate.timings.items():
        for tokens, per in per_tokens.items():
            for d, t in per.items():
                assert (gate.choose(key, tokens, d) == "sparse") == (t["sparse_s"] < 0.95 * t["dense_s"])


def test_fallback_without_compiler_is_announced_once(monkeypatch, caplog):
    monkeypatch.setattr(ak, "_module", None)
    monkeypatch.setattr(ak, "_failed", None)
    monkeypatch.setenv("SPARSEFORGE_NO_CPP_KERNELS", "1")
    with caplog.at_level(logging.WARNING, logger="sparseforge.kernels.activation_sparse"):
        assert not ak.available() and not ak.available()
    assert sum("could not be built" in r.getMessage() for r in caplog.records) == 1
    # The layer still computes the thresholded product, through the reference.
    lin = torch.nn.Linear(16, 8, bias=True)
    gate = ak.ActivationGate({ak.gate_key(8, 16, torch.float32): {1: {1.0: {"dense_s": 1.0, "sparse_s": 0.1}}}})
    layer = ActivationSparseLinear(lin, torch.full((16,), 0.5), 0.5, gate)
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        assert not layer.uses_kernel(1)
        assert torch.allclose(layer(x), ak.reference_product(x, lin.weight, 0.5) + lin.bias)


def test_kernel_registry_and_reference_kernel_route_nothing():
    assert ak.activation_kernel_names() == ("auto", "row-skip", "reference", "triton")
    assert ak.get_activation_kernel("auto").pick("cpu", torch.float32).name == "row-skip"
    assert ak.get_activation_kernel("auto").pick("cpu", torch.float16) is None  # no CPU kernel reads float16
    assert not ak.get_activation_kernel("triton").supports("cpu", torch.bfloat16)
    lin = torch.nn.Linear(16, 8, bias=False)
    gate = ak.ActivationGate({ak.gate_key(8, 16, torch.float32): {1: {1.0: {"dense_s": 1.0, "sparse_s": 0.1}}}})
    assert ActivationSparseLinear(lin, torch.zeros(16), 0.5, gate, product="row-skip").uses_kernel(1)
    assert not ActivationSparseLinear(lin, torch.zeros(16), 0.5, gate, product="reference").uses_kernel(1)
    layer = ActivationSparseLinear(lin, torch.zeros(16), 0.5, gate, product="auto")
    assert layer.uses_kernel(1) and layer._decisions == {(1,): "sparse"}  # GatedLinear's cache
    layer.to(torch.float64)
    assert layer._decisions == {} and not layer.uses_kernel(1)  # a cast forgets the decision; no float64 kernel
    with pytest.raises(Exception, match="unknown activation kernel 'x'"):
        ak.get_activation_kernel("x")
