"""KIVI quantized cache: packing round trips, quantization error bounds, exact and bounded byte counts, the
residual window after prefill, attention over the dequantized cache (reference test), MiKV, bad input."""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from tiny_models import VOCAB, tiny_model  # noqa: E402

from sparseforge.errors import UserInputError  # noqa: E402
from sparseforge.methods import get_method  # noqa: E402
from sparseforge.methods.kv import cache_bytes, full_cache_bytes, generate_with_press  # noqa: E402
from sparseforge.methods.kv.base import cache_argument  # noqa: E402
from sparseforge.methods.kv.kivi import KIVILayer, dequantize, pack, quantize, unpack  # noqa: E402



def kivi(**params):
    cls = get_method("kivi")
    return cls(cls.parse_params(params))


def cache_of(*layers) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = list(layers)
    return cache


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


def test_pack_layout_is_low_bits_first():
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]


@pytest.mark.parametrize("bits", [2, 4])
def test_quantization_error_is_at_most_half_a_step(bits):
    x = torch.randn(4, 32, 64) * 3 + 1
    codes, scale, lo = quantize(x, bits, dim=1)
    assert scale.dtype == torch.float16 and codes.max() <= 2**bits - 1
    err = (dequantize(codes, scale, lo, torch.float32) - x).abs()
    assert (err <= scale.float() / 2 + 1e-3 * x.abs().max()).all()


@pytest.mark.parametrize("bits,group,bound", [(4, 64, 0.3), (2, 64, 0.2), (2, 32, 0.2)])
def test_bytes_fall_below_the_claimed_fraction_of_float16(bits, group, bound):
    keys = torch.randn(1, 2, 16384, 64, dtype=torch.float16)
    values = torch.randn_like(keys)
    layer = KIVILayer(bits=bits, group_size=group, residual_length=128)
    layer.update(keys, values)
    fp16 = 2 * keys.numel() * 2
    held = cache_bytes(cache_of(layer))
    assert held <= bound * fp16
    assert full_cache_bytes(cache_of(layer)) == fp16
    # Exact: codes + float16 (scale, min) per key block and channel / per value group, + the float16 residual.
    residual = layer.keys.shape[2]
    q = 16384 - residual
    key_codes = 2 * q * 64 * bits // 8
    key_stats = 2 * (q // group) * 64 * 2 * 2
    value_codes = q * 128 * bits // 8
    value_stats = q * (128 // group) * 2 * 2
    assert held == key_codes + key_stats + value_codes + value_stats + 2 * 2 * residual * 64 * 2


def test_residual_window_is_respected_after_a_long_prefill():
    layer = KIVILayer(bits=4, group_size=32, residual_length=128)
    keys = torch.randn(1, 2, 1000, 16)
    out_k, out_v = layer.update(keys, keys + 1)
    assert torch.equal(out_k, keys)  # the prefill's own attention sees full precision
    assert 128 <= layer.keys.shape[2] < 128 + 32
    assert layer.quantized_length() % 32 == 0 and layer.quantized_length() + layer.keys.shape[2] == 1000
    assert torch.equal(layer.keys, keys[:, :, -layer.keys.shape[2]:])
    assert layer.get_seq_length() == 1000


@pytest.mark.parametrize("bits,group,dtype", [(2, 16, torch.float32), (4, 8, torch.float32), (4, 32, torch.float32),
                                             (2, 16, torch.float16), (4, 16, torch.bfloat16)])
def test_attention_reads_the_dequantized_cache(bits, group, dtype):
    """Keys and values handed to attention = dequantized stored codes (recomputed here from the packed bytes, in
    float32 and rounded once to the model's dtype), then the full-precision residual, then the new token. Covers the
    in-place float32 path (value groups inside a head: 16 and 8 of 16 channels) and the others (a 32-channel value
    group spanning both heads; float16 and bfloat16 caches)."""
    torch.manual_seed(0)
    layer = KIVILayer(bits=bits, group_size=group, residual_length=16)
    layer.update(torch.randn(1, 2, 100, 16, dtype=dtype), torch.randn(1, 2, 100, 16, dtype=dtype))
    for _ in range(group + 1):  # decode past one more flush, so there are two segments
        layer.update(torch.randn(1, 2, 1, 16, dtype=dtype), torch.randn(1, 2, 1, 16, dtype=dtype))
    assert len(layer.segments) == 2
    new_k, new_v = torch.randn(1, 2, 1, 16, dtype=dtype), torch.randn(1, 2, 1, 16, dtype=dtype)
    segs, residual_k, residual_v = list(layer.segments), layer.keys.clone(), layer.values.clone()
    got_k, got_v = layer.update(new_k, new_v)
    assert got_k.dtype == dtype and got_v.dtype == dtype
    ref_k, ref_v = [], []
    for s in segs:
        k = unpack(s.key_codes, bits).float() * s.key_scale.float() + s.key_min.float()  # [b, h, blocks, block, d]
        ref_k.append(k.reshape(1, 2, -1, 16).to(dtype))
        v = unpack(s.value_codes, bits).float() * s.value_scale.float() + s.value_min.float()  # [b, n, groups, g]
        ref_v.append(v.reshape(1, -1, 2, 16).transpose(1, 2).to(dtype))
    torch.testing.assert_close(got_k, torch.cat(ref_k + [residual_k, new_k], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(got_v, torch.cat(ref_v + [residual_v, new_v], dim=2), rtol=0, atol=0)


def test_model_decodes_from_the_quantized_cache_like_a_plain_cache_of_dequantized_tensors():
    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(0))
    step = torch.tensor([[7]])
    p = kivi(bits=4, group_size=32, residual_length=32)
    key = cache_argument(model)
    p.attach(model)
    try:
        with torch.no_grad():
            cache = model(input_ids=tokens, use_cache=True).past_key_values
            plain = DynamicCache()
            for layer in cache.layers:
                assert isinstance(layer, KIVILayer) and layer.quantized_length() > 0
                k, v = layer.dequantized()
                new = DynamicLayer()
                new.lazy_initialization(k, v)
                new.keys, new.values = torch.cat([k, layer.keys], 2), torch.cat([v, layer.values], 2)
                plain.layers.append(new)
            out = model(input_ids=step, use_cache=True, **{key: cache})
    finally:
        p.detach(model)
    with torch.no_grad():
        ref = model(input_ids=step, use_cache=True, **{key: plain})
        dense = model(input_ids=torch.cat([tokens, step], 1)).logits[:, -1:]
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert (out.logits - dense).abs().max() < 0.05  # 4-bit is close to the dense model, not equal


def test_kivi_attach_detach_bit_identical_and_chunked_prefill():
    model = tiny_model("qwen2")
    tokens = torch.randint(0, VOCAB, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    r = generate_with_press(model, tokens, kivi(bits=2), max_new_tokens=3, chunk_size=64)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, before)
    layer = r.cache.layers[0]
    assert 128 <= layer.keys.shape[2] < 192 and layer.get_seq_length() == 302
    assert r.final_cache_bytes < 0.65 * r.full_cache_bytes  # float32 residual of ~170 tokens dominates at 300


def test_mikv_keeps_evicted_tokens_at_low_bits():
    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (1, 400), generator=torch.Generator().manual_seed(2))
    mixed = generate_with_press(model, tokens, kivi(bits=4, mikv_press="snapkv", compression_ratio=0.75), max_new_tokens=1)
    plain4 = generate_with_press(model, tokens, kivi(bits=4), max_new_tokens=1)
    layer = mixed.cache.layers[0]
    bits = [(s.bits, s.value_codes.shape[1]) for s in layer.segments]
    assert bits == [(4, 68), (2, 204)]  # 272 prompt tokens outside the residual: a quarter kept at 4 bits
    assert layer.get_seq_length() == 400 and layer.keys.shape[2] == 128
    assert mixed.final_cache_bytes < plain4.final_cache_bytes


@pytest.mark.parametrize(
    "params,match",
    [
        ({"bits": 3}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"residual_length": -1}, "residual_length"),
        ({"mikv_press": "nope"}, "unknown method"),
        ({"mikv_press": "magnitude"}, "scoring KV press"),
        ({"mikv_press": "snapkv", "low_bits": 4}, "low_bits"),
    ],
)
def test_bad_kivi_params(params, match):
    with pytest.raises(UserInputError, match=match) as info:
        get_method("kivi").parse_params(params)
    assert "\n" not in str(info.value)
