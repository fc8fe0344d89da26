"""Sparse kernels behind the speed gate: the gate's decisions, CSR (CPU) products against the dense reference,
the 2:4 module's dense behaviour off GPU, dispatch and its undo, and (on a CUDA GPU only) 2:4 products."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseforge import api
from sparseforge.core.dispatch import restore_dense, use_sparse_kernel
from sparseforge.errors import UserInputError
from sparseforge.kernels.base import SparseLinear, SpeedGate, get_kernel
from sparseforge.kernels.semi_structured import is_2of4, random_2of4_mask, semi_structured_supported
from sparseforge.kernels.sparse_csr import random_sparse_weight, sparsity_bucket
from tiny_models import tiny_model

GPU = pytest.mark.skipif(not semi_structured_supported(), reason="needs a CUDA GPU with compute capability >= 8.0")


def _gate(kernel="2:4"):
    # Sparse wins only for many tokens on the big shape; the small shape was never faster.
    return SpeedGate({
        "4096x4096": {1: {"dense_s": 1.0, "sparse_s": 1.5}, 128: {"dense_s": 1.0, "sparse_s": 0.97}, 2048: {"dense_s": 1.0, "sparse_s": 0.6}},
        "64x64": {2048: {"dense_s": 1.0, "sparse_s": 1.2}},
    }, kernel=kernel)


def _always(kernel: str, keys, tokens=(1, 4096)) -> SpeedGate:
    return SpeedGate({k: {t: {"dense_s": 1.0, "sparse_s": 0.1} for t in tokens} for k in keys}, kernel=kernel)


def test_gate_decisions_bucket_token_counts_and_respect_the_margin():
    gate = _gate()
    assert gate.choose("4096x4096", 1) == "dense"
    assert gate.choose("4096x4096", 100) == "dense"  # bucket 128: 3% faster is inside the 5% margin
    assert gate.choose("4096x4096", 129) == "sparse"  # bucket 2048
    assert gate.choose("4096x4096", 100000) == "sparse"  # above every measured count: the largest
    assert gate.choose("64x64", 4096) == "dense"
    assert gate.choose("11008x4096", 4096) == "dense"  # never measured
    assert gate.choices() == {("4096x4096", 1): "dense", ("4096x4096", 128): "dense", ("4096x4096", 2048): "sparse",
                              ("64x64", 2048): "dense"}
    again = SpeedGate.from_dict(json.loads(json.dumps(gate.to_dict())))
    assert again == gate
    with pytest.raises(UserInputError, match="malformed"):
        SpeedGate.from_dict({"timings": {"4x4": {"1": {"dense_s": 1.0}}}})


def test_unknown_kernel_is_a_clear_error():
    with pytest.raises(UserInputError, match="unknown sparse kernel 'bsr'.*csr"):
        get_kernel("bsr")


def test_random_2of4_mask_and_check():
    mask = random_2of4_mask(8, 16, torch.Generator().manual_seed(0))
    assert mask.reshape(8, 4, 4).sum(-1).eq(2).all()
    w = torch.randn(8, 16) * mask
    assert is_2of4(w)
    w[0, 1] = w[0, 0] = w[0, 2] = 1.0  # three nonzeros in the first group
    assert not is_2of4(w)
    assert not is_2of4(torch.zeros(4, 6))  # input dim not a multiple of 4


def test_2of4_module_falls_back_to_the_dense_product_off_gpu():
    kernel = get_kernel("2:4")
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.mul_(random_2of4_mask(32, 64, torch.Generator().manual_seed(1)))
    mod = SparseLinear(lin, kernel, _always("2:4", ["32x64"]))
    x = torch.randn(3, 5, 64)
    assert torch.equal(mod(x), lin(x))
    assert set(mod.state_dict()) == set(lin.state_dict()) and mod.weight is lin.weight
    # The 2:4 product needs float16/bfloat16 weights on a CUDA GPU of capability >= 8.0; this float32 CPU layer
    # therefore multiplies densely on every machine, a capable GPU included, whatever its gate says.
    assert not mod.uses_sparse(4096)
    assert not kernel.supports(torch.device("cpu"), torch.float16)
    assert not kernel.supports(torch.device("cuda"), torch.float32)
    assert kernel.supports(torch.device("cuda"), torch.float16) == semi_structured_supported()
    with pytest.raises(UserInputError, match="2:4"):
        SparseLinear(nn.Linear(64, 32), kernel, _gate())  # dense weight
    pruned_odd = nn.Linear(64, 20)
    with torch.no_grad():
        pruned_odd.weight.mul_(random_2of4_mask(20, 64))
    assert not kernel.accepts(pruned_odd.weight)  # 20 rows: not a multiple of 32, torch cannot store it


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_csr_product_matches_the_dense_reference(sparsity, tokens):
    g = torch.Generator().manual_seed(int(sparsity * 100) + tokens)
    w = random_sparse_weight(96, 80, sparsity, g)
    assert (w == 0).sum().item() == round(sparsity * w.numel())
    lin = nn.Linear(80, 96)
    with torch.no_grad():
        lin.weight.copy_(w)
    key = get_kernel("csr").key(w)
    mod = SparseLinear(lin, get_kernel("csr"), _always("csr", [key]))
    x = torch.randn(tokens, 80, generator=g)
    with torch.no_grad():
        assert mod.uses_sparse(tokens)
        assert torch.allclose(mod(x), F.linear(x, w, lin.bias), atol=1e-5, rtol=1e-5)
        x3 = torch.randn(2, tokens, 80, generator=g)  # batch and sequence dims
        assert torch.allclose(mod(x3), F.linear(x3, w, lin.bias), atol=1e-5, rtol=1e-5)


def test_csr_keys_round_sparsity_down_and_example_weights_match_them():
    kernel = get_kernel("csr")
    g = torch.Generator().manual_seed(0)
    assert kernel.key(random_sparse_weight(40, 50, 0.52, g)) == "40x50@0.50"
    assert kernel.key(random_sparse_weight(40, 50, 0.9, g)) == "40x50@0.90"  # exact 0.90 stays in its bucket
    assert kernel.key(torch.randn(40, 50)) == "40x50@0.00"
    example = kernel.example_weight("40x50@0.70", g)
    assert example.shape == (40, 50) and sparsity_bucket(example) == pytest.approx(0.70)
    assert not kernel.supports(torch.device("cpu"), torch.bfloat16)  # no CPU CSR product in half precision


def test_csr_copy_is_rebuilt_when_the_weight_changes():
    lin = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(random_sparse_weight(16, 32, 0.75, torch.Generator().manual_seed(0)))
    mod = SparseLinear(lin, get_kernel("csr"), _always("csr", [get_kernel("csr").key(lin.weight)]))
    x = torch.randn(4, 32)
    with torch.no_grad():
        mod(x)
        lin.weight.mul_(2.0)  # in-place edit, e.g. a later compression stage
        assert torch.allclose(mod(x), x @ lin.weight.t(), atol=1e-5)
    assert mod.uses_sparse(4)
    twin = copy.deepcopy(mod)  # the CSR copy is not copied (torch cannot), but rebuilt on the twin's first call
    with torch.no_grad():
        assert torch.allclose(twin(x), mod(x), atol=1e-6) and twin.weight is not mod.weight
    mod.bfloat16()  # no CPU CSR product in bfloat16: the remembered decision must not survive the cast
    assert not mod.uses_sparse(4)
    with torch.no_grad():
        assert torch.equal(mod(x.bfloat16()), F.linear(x.bfloat16(), lin.weight))


def test_sparse_path_is_inference_only_so_gradients_stay_correct():
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight.copy_(random_sparse_weight(16, 32, 0.75, torch.Generator().manual_seed(0)))
    mod = SparseLinear(lin, get_kernel("csr"), _always("csr", [get_kernel("csr").key(lin.weight)]))
    mod(torch.randn(4, 32)).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_measured_csr_gate_covers_every_key_and_count():
    keys = ["64x128@0.90", "128x64@0.50"]
    gate = SpeedGate.measure("csr", keys, [1, 32], repeats=3, warmup=1)
    assert gate.kernel == "csr" and set(gate.timings) == set(keys)
    assert all(set(per) == {1, 32} and all(v["dense_s"] > 0 and v["sparse_s"] > 0 for v in per.values())
               for per in gate.timings.values())
    with pytest.raises(UserInputError, match="cannot run on cpu"):
        SpeedGate.measure("2:4", ["64x64"], [1])


def test_dispatch_swaps_only_accepted_linears_keeps_outputs_and_undoes(tokenizer):
    model = tiny_model("llama")
    pruned, _ = api.compress(model, "magnitude-2of4", tokenizer, progress=False)
    with torch.no_grad():
        pruned.model.layers[1].mlp.down_proj.weight.add_(0.001)  # no longer 2:4: must be skipped
    ids = torch.randint(0, 4000, (1, 24))
    with torch.no_grad():
        before = pruned(ids).logits
    keys_before = set(pruned.state_dict())
    report = use_sparse_kernel(pruned, "2:4", _gate())
    assert report["skipped"] == ["model.layers.1.mlp.down_proj"]
    assert len(report["replaced"]) == 13
    assert isinstance(pruned.model.layers[0].self_attn.q_proj, SparseLinear)
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, before)
    assert set(pruned.state_dict()) == keys_before
    with pytest.raises(UserInputError, match="measured for the '2:4' kernel"):
        use_sparse_kernel(copy.deepcopy(pruned), "csr", _gate("2:4"))
    assert restore_dense(pruned) == 13
    assert type(pruned.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, before)


def test_dispatch_measures_a_csr_gate_and_agrees_with_the_dense_model(tokenizer):
    model = tiny_model("llama")
    pruned, _ = api.compress(model, "magnitude-50", tokenizer, progress=False)
    ids = torch.randint(0, 4000, (1, 20))
    with torch.no_grad():
        before = pruned(ids).logits
    report = use_sparse_kernel(pruned, "csr", token_counts=(1, 20), repeats=2, warmup=1)
    assert len(report["replaced"]) == 14 and report["skipped"] == []
    assert set(report["gate"].timings) == {"64x64@0.50", "32x64@0.50", "128x64@0.50", "64x128@0.50"}
    # Force the sparse path everywhere so the comparison exercises it, whatever this machine measured.
    for module in pruned.modules():
        if isinstance(module, SparseLinear):
            module.gate = _always("csr", [module.gate_key], tokens=(20,))
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, before, atol=1e-4, rtol=1e-4)


@GPU
@pytest.mark.parametrize("tokens", [1, 16, 128])
def test_2of4_kernel_matches_dense_product(tokens):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 512, generator=g) * random_2of4_mask(256, 512, g)).half().cuda()
    lin = nn.Linear(512, 256, bias=True).half().cuda()
    with torch.no_grad():
        lin.weight.copy_(w)
    mod = SparseLinear(lin, get_kernel("2:4"), _always("2:4", ["256x512"], tokens=(tokens,)))
    x = torch.randn(tokens, 512, generator=g).half().cuda()
    with torch.no_grad():
        assert mod.uses_sparse(tokens)
        ref = F.linear(x.float(), w.float(), lin.bias.float())
        assert torch.allclose(mod(x).float(), ref, atol=2e-2, rtol=2e-2)


@GPU
def test_2of4_gate_measurement_covers_every_shape_and_count():
    gate = SpeedGate.measure("2:4", ["256x512"], [1, 256], device="cuda", dtype=torch.float16, repeats=3, warmup=1)
    assert set(gate.timings["256x512"]) == {1, 256}
    assert all(v["dense_s"] > 0 and v["sparse_s"] > 0 for v in gate.timings["256x512"].values())
