"""Packed storage of quantized weights (core/quantizer.py's `QuantizedWeight`), and its exact inverse.

Codes go through a small codec registry keyed by bit width: int8 stores one code per byte, int4 two per
byte (first code in the high nibble), 2 and 3 bits a plain bit stream (most significant bit first). Beside the
codes: float32 scales [out, groups] and, for asymmetric schemes, uint8 zero points [out, groups] (symmetric
ones are implied by the bit width). A sparse quantized weight (pruned, then rounded) stores a bitmask of its
nonzero weights (formats/sparse_storage.py) and the codes of those weights only; the others get the group's
zero point back, whose dequantized value is exactly 0. SpQR outliers are a flat int32 index plus float32
values. Packed codes and masks are then deflated where that pays (DEFLATE_GAIN). Reading applies `QuantizedWeight.dequantize`, the same formula the method used, so a reloaded weight is
bit-identical to the one in the model that was saved.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Callable

import torch

from sparseforge.core.quantizer import QuantizedWeight, QuantScheme
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
    nonzero = codes != qw.expanded(qw.zero).to(torch.uint8)
    parts: dict[str, torch.Tensor] = {"qscale": qw.scale.float().contiguous()}
    sparse = nonzero.float().mean().item() <= SPARSE_KEEP
    if sparse:
        parts["qmask"] = pack_bits(nonzero)
        parts["qcodes"] = codec.pack(codes[nonzero].contiguous())
    else:
        parts["qcodes"] = codec.pack(codes.reshape(-1))
    if not scheme.symmetric:
        parts["qzero"] = qw.zero.to(torch.uint8).contiguous()
    if qw.outliers is not None:
        o = qw.outliers.coalesce()
        parts["qoutlier_index"] = (o.indices()[0] * codes.shape[1] + o.indices()[1]).to(torch.int32)
        parts["qoutlier_value"] = o.values().float().contiguous()
    layout = {"format": "quant", **scheme.to_json(), "shape": list(codes.shape), "sparse": sparse, "deflated": []}
    for name in DEFLATED_PARTS:
        if name in parts and parts[name].numel() >= 1024:
            deflated = zlib.compress(parts[name].numpy().tobytes(), 1)
            if len(deflated) <= (1 - DEFLATE_GAIN) * parts[name].numel():
                parts[name] = torch.frombuffer(bytearray(deflated), dtype=torch.uint8)
                layout["deflated"].append(name)
    return parts, layout


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
    scale = parts["qscale"].float().reshape(rows, scheme.groups(cols))
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
        codes = qw.expanded(zero).to(torch.uint8)
        codes[mask] = codec.unpack(qcodes, kept)
    else:
        qcodes = _inflate(parts["qcodes"], packed_size(rows * cols)) if "qcodes" in deflated else parts["qcodes"]
        codes = codec.unpack(qcodes, rows * cols).reshape(rows, cols).clone()
    if int(codes.max()) > scheme.maxq:
        raise ValueError(f"codes exceed {scheme.bits} bits")
    outliers = None
    if "qoutlier_index" in parts:
        flat = parts["qoutlier_index"].long()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= rows * cols):
            raise ValueError("outlier index outside the weight")
        outliers = torch.sparse_coo_tensor(torch.stack([flat // cols, flat % cols]), parts["qoutlier_value"].float(), (rows, cols),
                                           check_invariants=True).coalesce()
    return QuantizedWeight(codes, scale, zero, scheme, outliers)
