"""compressed-tensors export: the packing is the library's own, the checkpoint loads in transformers (through the
compressed-tensors integration) with outputs matching sparseforge's model, the library's own decompressor gives
back the dequantized weights, and bad inputs fail in one line (API and CLI)."""
import json

import pytest
import torch

import sparseforge
from sparseforge.cli import main as cli_main
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.errors import UserInputError
from sparseforge.methods import get_method
from sparseforge.recipe import Recipe, Stage
from tiny_models import tiny_model

ct = pytest.importorskip("compressed_tensors")
torch.set_num_threads(1)


def _quantized(tokenizer, method="gptq", **params):
    cls = get_method(method)
    recipe = Recipe("t", [Stage(method, cls.parse_params(params))], CalibrationConfig(samples=2, seq_len=32))
    return sparseforge.compress(tiny_model("llama"), recipe, tokenizer, progress=False)[0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_the_library(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from sparseforge.formats.compressed_tensors_export import pack_int32

    codes = torch.randint(0, 2**bits, (7, 77), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    assert torch.equal(pack_int32(codes, bits), pack_to_int32((codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8), bits))


@pytest.mark.parametrize("params", [{"bits": 4, "group_size": 32}, {"bits": 8, "group_size": 0}])
def test_export_loads_in_transformers_and_the_library_with_matching_outputs(params, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from sparseforge.formats.compressed_tensors_export import export_compressed_tensors

    q = _quantized(tokenizer, **params)
    export_compressed_tensors(q, tmp_path / "ct", tokenizer)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - q(ids).logits).abs().max().item() <= 1e-5
    # the library's own decompressor on one module's tensors
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    raw = load_file(tmp_path / "ct" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    group = next(g for g in config["config_groups"].values() if name in g["targets"])
    scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
    local = {k.removeprefix(name + "."): v for k, v in raw.items() if k.startswith(name + ".")}
    out = PackedQuantizationCompressor.decompress(local, scheme)
    assert torch.equal(out["weight"].float(), q.model.layers[1].mlp.down_proj.weight)


def test_cli_export_and_its_errors(tokenizer, tmp_path, capsys):
    sparseforge.save(_quantized(tokenizer, bits=4, group_size=32), tmp_path / "art", tokenizer, storage="compact")
    assert cli_main(["export", "--model", str(tmp_path / "art"), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    assert (tmp_path / "ct" / "model.safetensors").is_file()
    # a dense artifact has no codes
    sparseforge.save(tiny_model("llama"), tmp_path / "plain", tokenizer)
    assert cli_main(["export", "--model", str(tmp_path / "plain"), "--format", "compressed-tensors", "--out", str(tmp_path / "x")]) != 0
    assert "no quantized linear layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["export", "--model", str(tmp_path / "art"), "--format", "gguf", "--out", str(tmp_path / "y")])


def test_asymmetric_codes_are_refused(tokenizer, tmp_path):
    from sparseforge.formats.compressed_tensors_export import export_compressed_tensors

    with pytest.raises(UserInputError, match="symmetric: true"):
        export_compressed_tensors(_quantized(tokenizer, bits=4, group_size=32, symmetric=False), tmp_path / "ct")


def test_asymmetric_files_match_the_library_but_transformers_still_refuses_them(tokenizer, tmp_path):
    """Why asymmetric export is refused: our tensors are the library's own (its compressor writes the same packed
    zero points, its decompressor reads our weight back exactly), yet transformers 5.24 + compressed-tensors 0.20.1
    allocate unpacked zero points and reject the checkpoint. If this starts loading, lift the refusal."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sparseforge.core.quantizer import quantized_weights
    from sparseforge.formats.compressed_tensors_export import export_compressed_tensors

    q = _quantized(tokenizer, bits=4, group_size=32, symmetric=False)
    export_compressed_tensors(q, tmp_path / "ct", tokenizer, allow_asymmetric=True)
    raw = load_file(tmp_path / "ct" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    qw = quantized_weights(q)[name + ".weight"]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32))
    weight = q.model.layers[0].mlp.down_proj.weight.data
    theirs = PackedQuantizationCompressor.compress({"weight": weight, "weight_scale": qw.scale, "weight_zero_point": (qw.zero - 8).to(torch.int8)}, scheme)
    for part in ("weight_packed", "weight_zero_point"):
        assert torch.equal(raw[f"{name}.{part}"], theirs[part]), part
    local = {k.removeprefix(name + "."): v for k, v in raw.items() if k.startswith(name + ".")}
    assert torch.equal(PackedQuantizationCompressor.decompress(local, scheme)["weight"].float(), weight)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ct")


def test_spqr_weights_stay_float_in_the_export(tokenizer, tmp_path):
    from sparseforge.formats.compressed_tensors_export import export_compressed_tensors

    q = _quantized(tokenizer, method="spqr", symmetric=True)
    with pytest.raises(UserInputError, match="no quantized linear layers"):
        export_compressed_tensors(q, tmp_path / "ct", tokenizer)
