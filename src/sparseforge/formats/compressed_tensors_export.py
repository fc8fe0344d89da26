"""Export of a quantized model as a compressed-tensors `pack-quantized` checkpoint (the format vLLM serves and
transformers loads through its compressed-tensors integration).

Per quantized nn.Linear `name`: `name.weight_packed` int32 [out, ceil(in·bits/32)] (the codes as unsigned
q = signed + 2^(bits-1), element i of a row at bits [i·bits, (i+1)·bits) of the row's little-endian bit stream),
`name.weight_scale` [out, groups] in the model's dtype, and `name.weight_shape` int64 [2]. sparseforge's symmetric
grid is compressed-tensors' signed symmetric one (q - 2^(bits-1) in [-2^(bits-1), 2^(bits-1) - 1], no zero point),
so codes and scales are written as they are. Asymmetric codes add `name.weight_zero_point`, the signed zero points
z - 2^(bits-1) packed along the output dimension, exactly what the library's own compressor writes (tested); but
transformers 5.24 with compressed-tensors 0.20.1 builds the module it loads them into with unpacked zero points
[out, groups] and refuses the file's packed shape (llm-compressor issues #1618 and #1704), so the public entry
refuses them unless `allow_asymmetric=True` (a test keeps checking that transformers still refuses).
SpQR weights (outliers or second-level statistics) have no compressed-tensors form and stay float; sparse +
quantized weights are written as their dense codes: compressed-tensors 0.20.1 ships no sparse compressor (only
the `sparse-bitmask` / `sparse-24-bitmask` config classes) and vLLM removed its Sparse24 support (PR #36799).
One config group per distinct scheme, its targets the module names; every other nn.Linear (the LM head
included) is in `ignore` and stays in float, as do embeddings (rounded ones as their dequantized values). The
packing matches the library's own `pack_to_int32` (tests/test_quant_export.py).
"""
from __future__ import annotations

import json
import pathlib

import torch
from torch import nn

from sparseforge.core.quantizer import QuantizedWeight, quantized_weights
from sparseforge.errors import UserInputError
from sparseforge.formats.output import atomic_directory


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [rows, cols] (< 2^bits) -> int32 [rows, ceil(cols·bits/32)], LSB-first bit stream per row."""
    rows, cols = codes.shape
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((codes.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(rows, cols * bits)
    words = -(-cols * bits // 32)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - cols * bits))
    value = (stream.reshape(rows, words, 32) << torch.arange(32, dtype=torch.int64)).sum(-1)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)  # two's complement wrap


def _weights_args(qw: QuantizedWeight) -> dict:
    s = qw.scheme
    grouped = s.group_size not in (0, qw.shape[1])
    return {"num_bits": s.bits, "type": "int", "symmetric": s.symmetric, "strategy": "group" if grouped else "channel",
            "group_size": s.group_size if grouped else None, "dynamic": False, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}, "block_structure": None}


def export_compressed_tensors(model, directory, tokenizer=None, overwrite: bool = False, allow_asymmetric: bool = False) -> pathlib.Path:
    from safetensors.torch import save_file

    records = quantized_weights(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = {}
    for name, module in linears.items():
        qw = records.get(f"{name}.weight")
        if qw is not None and qw.outliers is None and qw.stats is None and torch.equal(qw.dequantize().to(module.weight.dtype), module.weight.data):
            if qw.shape[1] % max(qw.scheme.group_size, 1):
                raise UserInputError(f"{name}: input size {qw.shape[1]} is not a multiple of group_size {qw.scheme.group_size}, "
                                     "which compressed-tensors needs; re-quantize with a group size that divides it")
            chosen[name] = qw
    asym = [n for n, qw in chosen.items() if not qw.scheme.symmetric]
    if asym and not allow_asymmetric:
        # compressed-tensors 0.20.1 writes asymmetric zero points packed but builds the module it loads them into
        # with unpacked ones, so transformers refuses its own files' shapes; symmetric codes have no zero point.
        raise UserInputError(f"{asym[0]} has asymmetric codes, which transformers 5.24 cannot load from a compressed-tensors "
                             "checkpoint (it expects unpacked zero points; llm-compressor issue #1704); re-quantize with symmetric: true")
    if not chosen:
        raise UserInputError("this model has no quantized linear layers to export (run gptq, rtn or sparsegpt-gptq first, "
                             "or load a compact artifact); for a plain checkpoint use `sparseforge export --dense OUT`")
    groups: dict[str, dict] = {}
    for name, qw in chosen.items():
        args = _weights_args(qw)
        key = json.dumps(args, sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": args, "input_activations": None, "output_activations": None, "format": "pack-quantized"})
        groups[key]["targets"].append(name)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue  # tied copies (an LM head sharing the embedding) once, as save_pretrained does
        seen.add(t.data_ptr())
        module = key.rsplit(".", 1)[0]
        if module in chosen and key.endswith(".weight"):
            qw = chosen[module]
            state[f"{module}.weight_packed"] = pack_int32(qw.codes, qw.scheme.bits)
            state[f"{module}.weight_scale"] = qw.scale.to(t.dtype).contiguous()
            state[f"{module}.weight_shape"] = torch.tensor(list(qw.shape), dtype=torch.int64)
            if not qw.scheme.symmetric:  # unsigned zero points are the signed ones + 2^(bits-1), as codes are
                state[f"{module}.weight_zero_point"] = pack_int32(qw.zero.to(torch.uint8).t().contiguous(), qw.scheme.bits).t().contiguous()
        else:
            state[key] = t.detach().cpu().contiguous()
    quant_config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                    "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
                    "ignore": sorted(n for n in linears if n not in chosen), "kv_cache_scheme": None, "global_compression_ratio": None}
    with atomic_directory(directory, overwrite, [("input model", getattr(model, "sparseforge_source", None))]) as tmp:
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"] = quant_config
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return pathlib.Path(directory)
