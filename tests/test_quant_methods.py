"""RTN, GPTQ and joint SparseGPT+GPTQ as recipe stages: the weights are exactly their codes, packed storage
restores them bit for bit (and the codes), sizes shrink as the bit widths say, bad parameters fail in one line."""
import pytest
import torch

import sparseforge
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.core.quantizer import QuantizedWeight, QuantScheme, quantize_rtn, quantized_weights
from sparseforge.errors import UserInputError
from sparseforge.formats.quant_storage import CODECS, pack_quantized, unpack_quantized
from sparseforge.methods import get_method
from sparseforge.recipe import Recipe, Stage
from tiny_models import tiny_model

torch.set_num_threads(1)
CAL = CalibrationConfig(samples=4, seq_len=64)


def _compress(model, method, tokenizer, **params):
    cls = get_method(method)
    recipe = Recipe("t", [Stage(method, cls.parse_params(params))], CAL)
    return sparseforge.compress(model, recipe, tokenizer, progress=False)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codecs_round_trip_and_pack_densely(bits):
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = CODECS[bits].pack(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(CODECS[bits].unpack(packed, 1001), codes)


@pytest.mark.parametrize("scheme", [QuantScheme(4, True, 32), QuantScheme(3, False, 0), QuantScheme(8, False, 64), QuantScheme(2, True, 128)])
def test_pack_unpack_is_exact_dense_sparse_and_with_outliers(scheme):
    w = torch.randn(24, 200)
    qw = quantize_rtn(w, scheme)
    for sparse in (False, True):
        if sparse:
            qw = quantize_rtn(w * (torch.rand(24, 200, generator=torch.Generator().manual_seed(0)) < 0.4), scheme)
        parts, layout = pack_quantized(qw)
        assert (layout["sparse"] or not sparse) and ("qzero" in parts) == (not scheme.symmetric)
        back = unpack_quantized(parts, layout)
        assert torch.equal(back.codes, qw.codes) and torch.equal(back.dequantize(), qw.dequantize())
    out = torch.sparse_coo_tensor(torch.tensor([[1, 5], [3, 7]]), torch.tensor([9.5, -3.25]), qw.shape, check_invariants=True)
    qo = QuantizedWeight(qw.codes, qw.scale, qw.zero, scheme, out)
    back = unpack_quantized(*pack_quantized(qo))
    assert back.dequantize()[1, 3] == 9.5 and torch.equal(back.dequantize(), qo.dequantize())


def test_deflated_codes_round_trip_and_a_corrupt_part_is_refused():
    w = torch.randn(64, 256)  # bell-shaped: 8-bit codes deflate
    qw = quantize_rtn(w, QuantScheme(8, True, 128))
    parts, layout = pack_quantized(qw)
    assert layout["deflated"] == ["qcodes"] and parts["qcodes"].numel() < 0.97 * w.numel()
    assert torch.equal(unpack_quantized(parts, layout).codes, qw.codes)
    parts["qcodes"] = parts["qcodes"][:-10]
    with pytest.raises(Exception):
        unpack_quantized(parts, layout)


@pytest.mark.parametrize("method,params", [("rtn", {"bits": 4, "group_size": 32}), ("gptq", {"bits": 3, "group_size": 32, "symmetric": False}),
                                           ("gptq", {"bits": 4, "group_size": 0, "act_order": True}),
                                           ("sparsegpt-gptq", {"pattern": "2:4", "bits": 4, "group_size": 32, "embedding_bits": 8}),
                                           ("spqr", {"bits": 3, "group_size": 16})])
def test_stage_weights_are_their_codes_and_compact_storage_restores_them(method, params, tokenizer, tmp_path):
    model = tiny_model("llama")
    out, report = _compress(model, method, tokenizer, **params)
    records = quantized_weights(out)
    state = out.state_dict()
    assert len(records) == 14 + bool(params.get("embedding_bits"))
    for key, qw in records.items():
        assert torch.equal(qw.dequantize(), state[key]), key
        assert int(qw.codes.max()) < 2 ** qw.scheme.bits and qw.scheme.bits == (params["bits"] if "embed" not in key else 8)
    assert report["stages"][0]["quant"]["bits"] == params["bits"]
    sparseforge.save(out, tmp_path / "a", tokenizer, storage="compact")
    back = sparseforge.load(tmp_path / "a")
    assert all(torch.equal(v, state[k]) for k, v in back.state_dict().items())
    assert set(quantized_weights(back)) == set(records)
    ids = torch.randint(0, 4096, (1, 16))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, out(ids).logits)


def test_gptq_beats_rtn_on_the_layers_it_sees(tokenizer):
    """Per-layer reconstruction error on calibration inputs: GPTQ's output error is below RTN's at 3 bits."""
    model = tiny_model("llama")
    rtn, _ = _compress(model, "rtn", tokenizer, bits=3, group_size=32)
    gptq, _ = _compress(model, "gptq", tokenizer, bits=3, group_size=32)
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits, -1)
        kl = lambda m: torch.nn.functional.kl_div(torch.log_softmax(m(ids).logits, -1), ref, log_target=True, reduction="batchmean").item()  # noqa: E731
        assert kl(gptq) < kl(rtn)


def test_a_later_stage_that_changes_the_weights_drops_the_codes(tokenizer, tmp_path):
    model = tiny_model("llama")
    out, _ = _compress(model, "rtn", tokenizer, bits=4)
    w = out.model.layers[0].mlp.down_proj.weight
    w.data[0, 0] += 1.0
    sparseforge.save(out, tmp_path / "a", tokenizer, storage="compact")
    back = sparseforge.load(tmp_path / "a")
    assert torch.equal(back.model.layers[0].mlp.down_proj.weight, w)  # stored as float, not as stale codes
    assert "model.layers.0.mlp.down_proj.weight" not in quantized_weights(back)


def test_gpt2_conv1d_is_quantized_in_its_own_layout(tokenizer, tmp_path):
    model = tiny_model("gpt2")
    out, _ = _compress(model, "gptq", tokenizer, bits=4, group_size=32)
    sparseforge.save(out, tmp_path / "a", tokenizer, storage="compact")
    back = sparseforge.load(tmp_path / "a")
    assert all(torch.equal(v, out.state_dict()[k]) for k, v in back.state_dict().items())


@pytest.mark.parametrize("method,params,match", [
    ("gptq", {"bits": 5}, "bits 5"), ("rtn", {"group_size": -1}, "group_size"), ("gptq", {"dampening": 1.5}, "dampening"),
    ("gptq", {"blocksize": 0}, "blocksize"), ("rtn", {"embedding_bits": 7}, "embedding_bits"),
    ("sparsegpt-gptq", {"pattern": "4:8", "group_size": 36}, "multiple of M"), ("sparsegpt-gptq", {"sparsity": 1.2}, "sparsity"),
    ("gptq", {"act_order": "yes"}, "true or false"), ("rtn", {"symmetric": 1}, "true or false"),
    ("spqr", {"outlier_threshold": 0}, "outlier_threshold"), ("spqr", {"group_size": 0}, "needs groups"),
    ("sparsegpt-gptq", {"blocksize": -1}, "blocksize"), ("sparsegpt-gptq", {"dampening": -0.1}, "dampening"),
    ("sparsegpt-gptq", {"pattern": "3:2"}, "pattern"), ("spqr", {"bits": 1}, "bits 1"), ("gptq", {"frobnicate": 1}, "unknown parameter"),
    ("quant-kernel", {"repeats": 0}, "repeats"), ("quant-kernel", {"warmup": -1}, "warmup")])
def test_bad_params_fail_in_one_line(method, params, match):
    with pytest.raises(UserInputError, match=match) as err:
        get_method(method).parse_params(params, "stage 1")
    assert "\n" not in str(err.value)
