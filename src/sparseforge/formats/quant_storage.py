"""Packed storage of quantized weights (core/quantizer.py's `QuantizedWeight`), and its exact inverse.

Codes go through a small codec registry keyed by bit width: int8 stores one code per byte, int4 two per
byte (first code in the high nibble), 2 and 3 bits a plain bit stream (most significant bit first). Beside the
codes: float32 scales [out, groups] and, for asymmetric schemes, uint8 zero points [out, groups] (symmetric
ones are implied by the bit width). A sparse quantized weight (pruned, then rounded) stores a bitmask of its
nonzero weights (formats/sparse_storage.py) and the codes of those weights only; the others get the group's
zero point back, whose dequantized value is exactly 0. Outliers (SpQR, EasyQuant) are a CSR matrix: int32 row
offsets [out + 1], int16 column indices (int32 when the input is wider than 32767) and float16 values (float32
if any value is not a float16 number). SpQR's second-level statistics replace the float32 scales (and uint8
zero points): their codes packed by the same codecs, plus float16 second-level scales and zeros. Packed codes
and masks are then deflated where that pays (DEFLATE_GAIN). Reading applies `QuantizedWeight.dequantize` and
`StatCodes.values`, the formulas the method used, so a reloaded weight is bit-identical to the one saved.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Callable

import torch

from sparseforge.core.quantizer import QuantizedWeight, QuantScheme, StatCodes
from sparseforge.formats.sparse_storage import pack_bits, unpack_bits

# A weight is stored sparse when at most this fraction of it is nonzero (below, codes + bitmask beat codes alone
# from 4 bits: (1 + b * kept) < b).
SPARSE_KEEP = 0.75
# Packed codes and masks are deflated (zlib level 1, as the float planes in sparse_storage.py) where that saves at
# least this fraction: low-bit codes of bell-shaped weights are far from uniform.
DEFLATE_GAIN = 0.03
DEFLATED_PARTS = ("qcodes", "qmask")


@dataclasses.dataclass(frozen=True)
class Codec:
    pack: Callable[[torch.Tensor], torch.Tensor]  # flat uint8 codes -> uint8 bytes
    unpack: Callable[[torch.Tensor, int], torch.Tensor]  # (bytes, count) -> flat uint8 codes


def _pack_int8(codes):
    return codes.contiguous()


def _unpack_int8(packed, count):
    return packed[:count]


def _pack_int4(codes):
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def _unpack_int4(packed, count):
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:count]


def _bitstream(bits: int) -> Codec:
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.uint8)

    def pack(codes):
        return pack_bits(((codes.reshape(-1, 1) >> shifts) & 1).bool())

    def unpack(packed, count):
        planes = unpack_bits(packed, count * bits).reshape(count, bits).to(torch.uint8)
        return (planes << shifts).sum(1, dtype=torch.uint8)

    return Codec(pack, unpack)


CODECS: dict[int, Codec] = {8: Codec(_pack_int8, _unpack_int8), 4: Codec(_pack_int4, _unpack_int4), 3: _bitstream(3), 2: _bitstream(2)}


def pack_quantized(qw: QuantizedWeight) -> tuple[dict[str, torch.Tensor], dict]:
    """({part name: tensor}, layout JSON) for a `QuantizedWeight` [out, in]."""
    scheme = qw.scheme
    codec = CODECS[scheme.bits]
    codes = qw.codes
    nonzero = codes != _zero_codes(qw)
    parts: dict[str, torch.Tensor] = {}
    if qw.stats:
        for stat, sc in qw.stats.items():  # "scale" -> qs_*, "zero" -> qz_*
            prefix = f"q{stat[0]}_"
            parts[prefix + "codes"] = CODECS[sc.bits].pack(sc.codes.reshape(-1).contiguous())
            parts[prefix + "scale"] = sc.scale.half().contiguous()
            parts[prefix + "zero"] = sc.zero.half().contiguous()
    else:
        parts["qscale"] = qw.scale.float().contiguous()
    sparse = nonzero.float().mean().item() <= SPARSE_KEEP
    if sparse:
        parts["qmask"] = pack_bits(nonzero)
        parts["qcodes"] = codec.pack(codes[nonzero].contiguous())
    else:
        parts["qcodes"] = codec.pack(codes.reshape(-1))
    if not scheme.symmetric and not (qw.stats and "zero" in qw.stats):
        parts["qzero"] = qw.zero.to(torch.uint8).contiguous()
    if qw.outliers is not None:
        parts.update(_pack_outliers(qw.outliers, *codes.shape))
    layout = {"format": "quant", **scheme.to_json(), "shape": list(codes.shape), "sparse": sparse, "deflated": []}
    if qw.stats:
        layout["stats"] = {stat: {"bits": sc.bits, "group_size": sc.group_size} for stat, sc in qw.stats.items()}
    for name in DEFLATED_PARTS:
        if name in parts and parts[name].numel() >= 1024:
            deflated = zlib.compress(parts[name].numpy().tobytes(), 1)
            if len(deflated) <= (1 - DEFLATE_GAIN) * parts[name].numel():
                parts[name] = torch.frombuffer(bytearray(deflated), dtype=torch.uint8)
                layout["deflated"].append(name)
    return parts, layout


def _zero_codes(qw: QuantizedWeight) -> torch.Tensor:
    """Each weight's code of 0 (its zero point, rounded and clipped: SpQR's zero points are floats)."""
    return qw.expanded(qw.zero).round().clamp(0, qw.scheme.maxq).to(torch.uint8)


def _pack_outliers(outliers: torch.Tensor, rows: int, cols: int) -> dict[str, torch.Tensor]:
    o = outliers.coalesce()  # row-major order: the CSR layout
    r, c = o.indices()
    values = o.values().float()
    half = values.half()
    counts = torch.bincount(r, minlength=rows)
    return {"qoutlier_rows": torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32),
            "qoutlier_cols": c.to(torch.int16 if cols <= 32767 else torch.int32).contiguous(),
            "qoutlier_value": (half if torch.equal(half.float(), values) else values).contiguous()}


def _unpack_outliers(parts: dict, rows: int, cols: int) -> torch.Tensor:
    offsets = parts["qoutlier_rows"].long()
    c = parts["qoutlier_cols"].long()
    if offsets.numel() != rows + 1 or int(offsets[0]) != 0 or int(offsets[-1]) != c.numel() or bool((offsets.diff() < 0).any()):
        raise ValueError("outlier row offsets do not match the weight")
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= cols):
        raise ValueError("outlier column index outside the weight")
    r = torch.repeat_interleave(torch.arange(rows), offsets.diff())
    return torch.sparse_coo_tensor(torch.stack([r, c]), parts["qoutlier_value"].float(), (rows, cols), check_invariants=True).coalesce()


def _inflate(part: torch.Tensor, size: int) -> torch.Tensor:
    # Bounded: a corrupt or hostile file cannot make this allocate more than the weight needs.
    inflater = zlib.decompressobj()
    data = inflater.decompress(part.numpy().tobytes(), size)
    if len(data) != size or inflater.unconsumed_tail:
        raise ValueError("deflated quantized codes do not have the size their layout says")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def unpack_quantized(parts: dict[str, torch.Tensor], layout: dict) -> QuantizedWeight:
    scheme = QuantScheme(int(layout["bits"]), bool(layout["symmetric"]), int(layout["group_size"]))
    scheme.check()
    rows, cols = (int(d) for d in layout["shape"])
    groups = scheme.groups(cols)
    stats = {}
    for stat, spec in (layout.get("stats") or {}).items():
        bits, size, prefix = int(spec["bits"]), int(spec["group_size"]), f"q{stat[0]}_"
        if stat not in ("scale", "zero") or bits not in CODECS or size < 1:
            raise ValueError(f"bad second-level statistics {stat}: {spec}")
        chunks = -(-rows // size)
        stats[stat] = StatCodes(bits, size, CODECS[bits].unpack(parts[prefix + "codes"], rows * groups).reshape(rows, groups).clone(),
                                parts[prefix + "scale"].reshape(chunks, groups), parts[prefix + "zero"].reshape(chunks, groups))
    scale = stats["scale"].values() if "scale" in stats else parts["qscale"].float().reshape(rows, groups)
    if "zero" in stats:
        zero = stats["zero"].values()
    else:
        zero = parts["qzero"].float().reshape(scale.shape) if "qzero" in parts else torch.full_like(scale, float((scheme.maxq + 1) // 2))
        if not scheme.symmetric and "qzero" not in parts:
            raise ValueError("asymmetric quantized weight without zero points")
    codec = CODECS[scheme.bits]
    deflated = set(layout.get("deflated", []))
    packed_size = lambda count: -(-count * scheme.bits // 8)  # noqa: E731  (every codec packs densely)
    if layout.get("sparse"):
        qmask = _inflate(parts["qmask"], -(-rows * cols // 8)) if "qmask" in deflated else parts["qmask"]
        mask = unpack_bits(qmask, rows * cols).reshape(rows, cols)
        kept = int(mask.sum())
        qcodes = _inflate(parts["qcodes"], packed_size(kept)) if "qcodes" in deflated else parts["qcodes"]
        qw = QuantizedWeight(torch.zeros(rows, cols, dtype=torch.uint8), scale, zero, scheme)
        codes = _zero_codes(qw)
        codes[mask] = codec.unpack(qcodes, kept)
    else:
        qcodes = _inflate(parts["qcodes"], packed_size(rows * cols)) if "qcodes" in deflated else parts["qcodes"]
        codes = codec.unpack(qcodes, rows * cols).reshape(rows, cols).clone()
    if int(codes.max()) > scheme.maxq:
        raise ValueError(f"codes exceed {scheme.bits} bits")
    outliers = _unpack_outliers(parts, rows, cols) if "qoutlier_rows" in parts else None
    return QuantizedWeight(codes, scale, zero, scheme, outliers, stats or None)
