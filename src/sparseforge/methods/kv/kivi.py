"""KIVI (Liu et al., 2024): a quantized KV cache whose memory really falls.

Keys are quantized per channel (statistics over blocks of `group_size` consecutive tokens, because key outliers
sit in fixed channels) and values per token (statistics over groups of `group_size` channels, taken across the
KV heads of the token). Codes are asymmetric (min and scale in float16) and bit-packed into uint8, 2 codes a byte
at 4 bits and 4 at 2 bits. The most recent `residual_length` to `residual_length + group_size - 1` tokens stay in
full precision, also right after a long prefill (transformers' QuantizedCache quantizes the whole prefill at once
whatever its residual length, transformers #35185). Attention reads the dequantized cache: every forward gets the
dequantized older tokens, then the full-precision residual and its own new tokens.

MiKV-style option (`mikv_press`): at the prompt's prefill, the tokens that press would evict at
`compression_ratio` are stored at `low_bits` instead of being dropped; the others at `bits`. The split is made on
the first forward's tokens (with chunked prefill: the first chunk's); later tokens are quantized at `bits`.

Bytes, per token and KV head of head size D, with float16 statistics: keys D*bits/8 + 4*D/group_size, values
D*bits/8 + 4*D/group_size (for group_size channels per value group); at bits 4, group 64: 0.28x of float16,
bits 2: 0.16x, plus the full-precision residual (tests/test_kivi.py asserts the bounds).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from sparseforge.errors import UserInputError
from sparseforge.methods.base import param, register
from sparseforge.methods.kv.base import KVPress, PressLayer, check_positive, check_ratio, prefix

_BITS = (2, 4, 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes < 2**bits along the last dimension, 8 // bits per byte (first code in the low bits)."""
    per = 8 // bits
    if codes.shape[-1] % per:
        raise UserInputError(f"cannot pack {codes.shape[-1]} codes of {bits} bits into whole bytes; use a head size divisible by {per}")
    grouped = codes.reshape(*codes.shape[:-1], -1, per)
    out = grouped[..., 0].clone()
    for i in range(1, per):
        out |= grouped[..., i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack(). One shift-and-mask per code position, then stacked: broadcasting a [per]-long shift vector
    over the bytes instead leaves a trailing dimension of 2-4 that does not vectorize on CPU."""
    per = 8 // bits
    if per == 1:
        return packed
    mask = (1 << bits) - 1
    parts = [packed & mask] + [(packed >> (bits * i)) & mask for i in range(1, per - 1)] + [packed >> (bits * (per - 1))]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per)


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of `x` with one (min, scale) per slice along `dim`: (codes uint8, scale, min),
    statistics in float16 and codes computed from the float16 statistics, so dequantize() is exact about them."""
    x = x.float()
    lo = x.amin(dim, keepdim=True).half()
    hi = x.amax(dim, keepdim=True)
    scale = ((hi - lo.float()) / (2**bits - 1)).clamp(min=1e-6).half()
    codes = ((x - lo.float()) / scale.float()).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, dtype) -> torch.Tensor:
    """codes * scale + lo computed in float32 (in place: one buffer instead of three), then cast to `dtype`."""
    x = codes.to(torch.float32)
    x.mul_(scale).add_(lo)
    return x.to(dtype)


class Segment(NamedTuple):
    """Quantized tokens: keys `[b, h, blocks, block, D*bits/8]` with statistics `[b, h, blocks, 1, D]`, values
    `[b, n, groups, group*bits/8]` with statistics `[b, n, groups, 1]`."""

    key_codes: torch.Tensor
    key_scale: torch.Tensor
    key_min: torch.Tensor
    value_codes: torch.Tensor
    value_scale: torch.Tensor
    value_min: torch.Tensor
    bits: int


def value_group(heads: int, dim: int, group_size: int) -> int:
    width = heads * dim
    return group_size if width % group_size == 0 else width


def quantize_segment(keys: torch.Tensor, values: torch.Tensor, bits: int, group_size: int) -> Segment:
    """One segment of n tokens; keys in blocks of `group_size` tokens (n must be a multiple, or smaller)."""
    b, h, n, d = keys.shape
    block = group_size if n % group_size == 0 else n
    kc, ks, km = quantize(keys.reshape(b, h, n // block, block, d), bits, dim=3)
    width = h * values.shape[-1]
    g = value_group(h, values.shape[-1], group_size)
    flat = values.transpose(1, 2).reshape(b, n, width // g, g)
    vc, vs, vm = quantize(flat, bits, dim=3)
    return Segment(pack(kc, bits), ks, km, pack(vc, bits), vs, vm, bits)


def dequantize_segment(seg: Segment, heads: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, blocks, block, _ = seg.key_codes.shape
    keys = dequantize(unpack(seg.key_codes, seg.bits), seg.key_scale, seg.key_min, dtype)
    keys = keys.reshape(b, h, blocks * block, -1)
    n = seg.value_codes.shape[1]
    values = dequantize(unpack(seg.value_codes, seg.bits), seg.value_scale, seg.value_min, dtype)
    values = values.reshape(b, n, heads, -1).transpose(1, 2)
    return keys, values


def write_segment(seg: Segment, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Dequantize one segment into `keys` / `values` ([b, h, n, d] slices of the output buffers). In float32 the
    codes are written and scaled in place in the destination, so no float temporaries are allocated: on CPU each
    fresh buffer costs its page faults, and this runs on every decode step over the whole cache."""
    b, h, blocks, block, _ = seg.key_codes.shape
    g = seg.value_codes.shape[3] * 8 // seg.bits  # channels per value group
    value_dim = values.shape[-1]
    if keys.dtype != torch.float32 or value_dim % g:
        # Other dtypes: compute in float32 and round once, as dequantize() does; groups spanning heads: via the layout.
        k, v = dequantize_segment(seg, h, keys.dtype)
        keys.copy_(k)
        values.copy_(v)
        return
    k = keys.unflatten(2, (blocks, block))
    k.copy_(unpack(seg.key_codes, seg.bits))
    k.mul_(seg.key_scale).add_(seg.key_min)
    n = seg.value_codes.shape[1]
    v = values.transpose(1, 2).unflatten(-1, (value_dim // g, g))  # [b, n, h, groups per head, g], a view
    per_head = (b, n, h, value_dim // g)
    v.copy_(unpack(seg.value_codes, seg.bits).view(*per_head, g))
    v.mul_(seg.value_scale.view(*per_head, 1)).add_(seg.value_min.view(*per_head, 1))


class KIVILayer(PressLayer):
    """A cache layer holding quantized segments plus a full-precision residual (`keys` / `values`)."""

    def __init__(self, bits: int = 4, group_size: int = 64, residual_length: int = 128, defer_prefill: bool = False):
        super().__init__()
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.defer_prefill = defer_prefill  # MiKV: the press splits the prompt's tokens after the forward
        self.segments: list[Segment] = []
        self.reference_shape = None  # (batch, heads, head_dim, dtype) for full_cache_bytes

    @classmethod
    def adopt(cls, old, **kwargs) -> "KIVILayer":
        new = cls(**kwargs)
        if getattr(old, "is_initialized", False) and old.keys is not None and old.keys.numel() > 0:
            new.update(old.keys, old.values)
        return new

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.reference_shape = (key_states.shape[0], key_states.shape[1], key_states.shape[-1], key_states.dtype)

    def quantized_length(self) -> int:
        return sum(s.value_codes.shape[1] for s in self.segments)

    def dequantized(self, residual: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every quantized segment in order, then `residual` (keys, values) when given, as [b, h, n, d] tensors of
        the model's dtype. Written into one preallocated buffer per tensor: this runs on every decode step, and
        concatenating the segments and then the residual copied the whole cache twice."""
        if not self.segments:
            return residual
        b, heads, key_dim, dtype = self.reference_shape
        first = self.segments[0]
        value_dim = first.value_codes.shape[2] * first.value_codes.shape[3] * 8 // first.bits // heads  # groups x g / heads
        n = self.quantized_length() + (residual[0].shape[2] if residual is not None else 0)
        keys = torch.empty(b, heads, n, key_dim, dtype=dtype, device=first.key_scale.device)
        values = torch.empty(b, heads, n, value_dim, dtype=dtype, device=first.key_scale.device)
        at = 0
        for seg in self.segments:
            size = seg.value_codes.shape[1]
            write_segment(seg, keys[:, :, at:at + size], values[:, :, at:at + size])
            at += size
        if residual is not None:
            keys[:, :, at:] = residual[0]
            values[:, :, at:] = residual[1]
        return keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first = self.seen == 0
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        self.last_update = key_states.shape[-2]
        keys, values = self.dequantized(residual=(self.keys, self.values))
        if not (self.defer_prefill and first and key_states.shape[-2] > 1):
            self.flush()
        return keys, values

    def flush(self) -> None:
        """Quantize the oldest residual tokens in whole key blocks, leaving residual_length..+group_size-1."""
        extra = self.keys.shape[-2] - self.residual_length
        n = (extra // self.group_size) * self.group_size if extra > 0 else 0
        if n == 0:
            return
        self.segments.append(quantize_segment(self.keys[:, :, :n], self.values[:, :, :n], self.bits, self.group_size))
        self.keys = self.keys[:, :, n:].clone()
        self.values = self.values[:, :, n:].clone()

    def held(self) -> int:
        return self.seen

    def keep(self, index):  # pragma: no cover - KIVI never evicts
        raise NotImplementedError

    def reset(self) -> None:
        super().reset()
        self.segments = []


@dataclasses.dataclass
class KIVIParams:
    bits: int = param(4, "bits per key and value code: 2, 4 or 8")
    group_size: int = param(64, "tokens per key block (per-channel statistics) and channels per value group")
    residual_length: int = param(128, "most recent tokens kept in full precision (also right after prefill)")
    mikv_press: str = param("", "MiKV: a scoring press (e.g. snapkv) whose evicted tokens are kept at low_bits instead; '' = off")
    compression_ratio: float = param(0.5, "MiKV only: fraction of the prompt's tokens stored at low_bits")
    low_bits: int = param(2, "MiKV only: bits for the tokens the press would evict")


@register
class KIVI(KVPress):
    name = "kivi"
    summary = "quantized KV cache: keys per channel, values per token, 2/4 bits bit-packed, full-precision recent window"
    Params = KIVIParams
    chunks = True

    def __init__(self, params=None):
        super().__init__(params)
        self.scorer: KVPress | None = None
        if self.params.mikv_press:
            from sparseforge.methods.base import get_method

            cls = get_method(self.params.mikv_press)
            self.scorer = cls(cls.parse_params({"compression_ratio": self.params.compression_ratio}))

    @classmethod
    def validate(cls, params, where=""):
        w = prefix(where)
        for name in ("bits", "low_bits"):
            if getattr(params, name) not in _BITS:
                raise UserInputError(f"{w}{name} must be one of {', '.join(map(str, _BITS))}, got {getattr(params, name)!r}")
        check_positive(params.group_size, w, "group_size")
        check_positive(params.residual_length, w, "residual_length", minimum=0)
        if params.mikv_press:
            from sparseforge.methods.base import get_method

            scorer = get_method(params.mikv_press)
            if not issubclass(scorer, KVPress) or scorer.name in ("kivi", "duo_attention"):
                raise UserInputError(f"{w}mikv_press must be a token-scoring KV press such as snapkv or h2o, got '{params.mikv_press}'")
            check_ratio(params.compression_ratio, w)
            if params.low_bits >= params.bits:
                raise UserInputError(f"{w}low_bits ({params.low_bits}) must be below bits ({params.bits})")

    @property
    def query_window(self) -> int:  # type: ignore[override]
        return self.scorer.query_window if self.scorer is not None else 0

    def make_layer(self, old, index):
        p = self.params
        return KIVILayer.adopt(old, bits=p.bits, group_size=p.group_size, residual_length=p.residual_length,
                               defer_prefill=self.scorer is not None)

    def after_forward(self, module, layer, queries, index, cache) -> None:
        if not isinstance(layer, KIVILayer):
            return
        if layer.defer_prefill and layer.seen == layer.last_update and not layer.segments and layer.last_update > 1:
            self._split_prompt(module, layer, queries, index)
        from sparseforge.methods.kv.base import cache_bytes

        if layer.last_update > 1:  # prefill only: see KVPress.after_forward
            self.peak_cache_bytes = max(self.peak_cache_bytes, cache_bytes(cache))

    def _split_prompt(self, module, layer: KIVILayer, queries, index) -> None:
        """MiKV: the prompt's tokens outside the residual window go to `bits` when the scorer keeps them, else to
        `low_bits`; the residual window stays in full precision."""
        n = layer.keys.shape[-2]
        n_old = max(0, n - layer.residual_length)
        if n_old == 0:
            return
        scores = self.scorer.score(module, layer, queries, index)[..., :n_old]
        n_hi = self.scorer.target(index, n_old)
        order = scores.topk(n_old, dim=-1).indices
        hi, lo = order[..., :n_hi].sort(-1).values, order[..., n_hi:].sort(-1).values

        def take(t, idx):
            return t.gather(2, idx.unsqueeze(-1).expand(*idx.shape, t.shape[-1]))

        p = self.params
        if n_hi:
            layer.segments.append(quantize_segment(take(layer.keys, hi), take(layer.values, hi), p.bits, p.group_size))
        if n_old - n_hi:
            layer.segments.append(quantize_segment(take(layer.keys, lo), take(layer.values, lo), p.low_bits, p.group_size))
        layer.keys = layer.keys[:, :, n_old:].clone()
        layer.values = layer.values[:, :, n_old:].clone()
