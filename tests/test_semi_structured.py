"""2:4 semi-structured path: the speed gate's decisions, the module's dense reference behaviour on CPU, and
(on a CUDA GPU only) agreement of the sparse kernel with the dense product."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseforge import api
from sparseforge.core.dispatch import use_semi_structured
from sparseforge.errors import UserInputError
from sparseforge.kernels.semi_structured import (
    SemiStructuredLinear,
    SpeedGate,
    is_2of4,
    random_2of4_mask,
    semi_structured_supported,
)
from tiny_models import tiny_model

GPU = pytest.mark.skipif(not semi_structured_supported(), reason="needs a CUDA GPU with compute capability >= 8.0")


def _gate():
    # Sparse wins only for many tokens on the big shape; the small shape was never faster.
    return SpeedGate({
        "4096x4096": {1: {"dense_s": 1.0, "sparse_s": 1.5}, 128: {"dense_s": 1.0, "sparse_s": 0.97}, 2048: {"dense_s": 1.0, "sparse_s": 0.6}},
        "64x64": {2048: {"dense_s": 1.0, "sparse_s": 1.2}},
    })


def test_gate_decisions_bucket_token_counts_and_respect_the_margin():
    gate = _gate()
    assert gate.choose(4096, 4096, 1) == "dense"
    assert gate.choose(4096, 4096, 100) == "dense"  # bucket 128: 3% faster is inside the 5% margin
    assert gate.choose(4096, 4096, 129) == "sparse"  # bucket 2048
    assert gate.choose(4096, 4096, 100000) == "sparse"  # above every measured count: the largest
    assert gate.choose(64, 64, 4096) == "dense"
    assert gate.choose(11008, 4096, 4096) == "dense"  # never measured
    again = SpeedGate.from_dict(json.loads(json.dumps(gate.to_dict())))
    assert again == gate
    with pytest.raises(UserInputError, match="malformed"):
        SpeedGate.from_dict({"timings": {"4x4": {"1": {"dense_s": 1.0}}}})


def test_random_2of4_mask_and_check():
    mask = random_2of4_mask(8, 16, torch.Generator().manual_seed(0))
    assert mask.reshape(8, 4, 4).sum(-1).eq(2).all()
    w = torch.randn(8, 16) * mask
    assert is_2of4(w)
    w[0, 1] = w[0, 0] = w[0, 2] = 1.0  # three nonzeros in the first group
    assert not is_2of4(w)
    assert not is_2of4(torch.zeros(4, 6))  # input dim not a multiple of 4


def test_module_falls_back_to_the_dense_product_off_gpu():
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.mul_(random_2of4_mask(32, 64, torch.Generator().manual_seed(1)))
    mod = SemiStructuredLinear(lin, _gate())
    x = torch.randn(3, 5, 64)
    assert torch.equal(mod(x), lin(x))
    assert set(mod.state_dict()) == set(lin.state_dict()) and mod.weight is lin.weight
    if not semi_structured_supported():
        assert not mod.uses_sparse(4096)
    with pytest.raises(UserInputError, match="2:4"):
        SemiStructuredLinear(nn.Linear(64, 32), _gate())


def test_dispatch_replaces_only_2of4_linears_and_keeps_outputs(tokenizer):
    model = tiny_model("llama")
    pruned, _ = api.compress(model, "magnitude-2of4", tokenizer, progress=False)
    with torch.no_grad():
        pruned.model.layers[1].mlp.down_proj.weight.add_(0.001)  # no longer 2:4: must be skipped
    ids = torch.randint(0, 4000, (1, 24))
    with torch.no_grad():
        before = pruned(ids).logits
    report = use_semi_structured(pruned, _gate())
    assert report["skipped"] == ["model.layers.1.mlp.down_proj"]
    assert len(report["replaced"]) == 13
    assert isinstance(pruned.model.layers[0].self_attn.q_proj, SemiStructuredLinear)
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, before)


@GPU
@pytest.mark.parametrize("tokens", [1, 16, 128])
def test_sparse_kernel_matches_dense_product(tokens):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 512, generator=g) * random_2of4_mask(256, 512, g)).half().cuda()
    lin = nn.Linear(512, 256, bias=True).half().cuda()
    with torch.no_grad():
        lin.weight.copy_(w)
    always_sparse = SpeedGate({"256x512": {tokens: {"dense_s": 1.0, "sparse_s": 0.1}}})
    mod = SemiStructuredLinear(lin, always_sparse)
    x = torch.randn(tokens, 512, generator=g).half().cuda()
    assert mod.uses_sparse(tokens)
    ref = F.linear(x.float(), w.float(), lin.bias.float())
    assert torch.allclose(mod(x).float(), ref, atol=2e-2, rtol=2e-2)


@GPU
def test_gate_measurement_covers_every_shape_and_count():
    gate = SpeedGate.measure([(256, 512)], [1, 256], repeats=3, warmup=1)
    assert set(gate.timings["256x512"]) == {1, 256}
    assert all(v["dense_s"] > 0 and v["sparse_s"] > 0 for v in gate.timings["256x512"].values())
