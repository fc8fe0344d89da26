"""Compact storage of sparse weights, and its exact inverse.

- bitmask: one bit per weight (row-major, packed 8 per byte) plus the nonzero values in row-major order.
  At 50% unstructured that is (1/8 + 1) / 2 of the dense bytes in bf16 and (1/32 + 1) / 2 in fp32.
- nm: for N:M along the input dimension, the N kept values of every group of M plus each one's position
  inside its group, packed two per byte (M <= 16). For 2:4 that is (1 + 1/4) / 2 of the dense bytes in
  bf16 and (1 + 1/16) / 2 in fp32.
Both round-trip bit for bit (a kept weight that happens to be exactly zero is stored as a kept zero).

- planes: lossless entropy coding of a float tensor's most significant byte (sign and high exponent bits).
  Trained weights use few exponents, so that byte deflates well while the mantissa bytes are close to
  random and are stored raw. Applied to every large float tensor of a compact artifact (packed values and
  unpruned tensors alike).

The ratios each codec reaches on the bundled model (and the zlib level trade-off below) are measured by
`benchmarks/weight_quality.py` and listed in benchmarks/results/weight_quality.md ("Compact storage codecs").
"""
from __future__ import annotations

import sys
import zlib

import torch

# zlib level 1: on this low-entropy byte it comes close to level 9's size in a small fraction of the time
# (both measured in benchmarks/results/weight_quality.md).
_PLANE_LEVEL = 1

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor (any shape) -> uint8 bytes, 8 flags per byte, most significant bit first."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.reshape(-1, 8) * _BITS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (packed.reshape(-1, 1) & _BITS) != 0
    return bits.reshape(-1)[:numel]


def pack_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = weight != 0
    return {"bitmask": pack_bits(mask), "values": weight[mask].contiguous()}


def unpack_bitmask(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    mask = unpack_bits(parts["bitmask"], numel).reshape(shape)
    out = torch.zeros(shape, dtype=parts["values"].dtype)
    out[mask] = parts["values"]
    return out


def pack_nm(weight: torch.Tensor, n: int, m: int) -> dict[str, torch.Tensor]:
    """Requires at most `n` nonzeros per group of `m` (check with masks.check_nm first). Groups with fewer
    nonzeros store kept zeros, so every group holds exactly `n` entries."""
    if m > 16:
        raise ValueError("nm storage packs positions in 4 bits: M must be <= 16")
    *lead, cols = weight.shape
    groups = weight.reshape(-1, cols // m, m)
    # Positions of the n entries to store: nonzeros first, in position order (stable).
    order = torch.argsort((groups == 0).to(torch.uint8), dim=-1, stable=True)[..., :n]
    position = torch.sort(order, dim=-1).values
    values = torch.gather(groups, -1, position)
    nibbles = position.reshape(-1).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.reshape(-1, 2)
    return {"values": values.reshape(*lead, cols // m * n).contiguous(), "positions": (pairs[:, 0] << 4) | pairs[:, 1]}


def unpack_nm(parts: dict[str, torch.Tensor], shape: tuple[int, ...], n: int, m: int) -> torch.Tensor:
    *lead, cols = shape
    values = parts["values"].reshape(-1, cols // m, n)
    packed = parts["positions"]
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[: values.numel()].long()
    out = torch.zeros(values.shape[0], cols // m, m, dtype=values.dtype)
    out.scatter_(-1, nibbles.reshape(values.shape), values)
    return out.reshape(shape)


def encode_planes(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a float tensor (2+ bytes per element) into its deflated top byte and its raw lower bytes."""
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
        raise RuntimeError("plane coding assumes a little-endian machine")
    size = tensor.element_size()
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).reshape(-1, size)
    top = raw[:, -1].contiguous().numpy().tobytes()
    deflated = torch.frombuffer(bytearray(zlib.compress(top, _PLANE_LEVEL)), dtype=torch.uint8)
    return {"planes_top": deflated, "planes_rest": raw[:, :-1].contiguous().reshape(-1)}


def decode_planes(parts: dict[str, torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Exact inverse of `encode_planes`."""
    size = torch.empty((), dtype=dtype).element_size()
    top = torch.frombuffer(bytearray(zlib.decompress(parts["planes_top"].numpy().tobytes())), dtype=torch.uint8)
    rest = parts["planes_rest"].reshape(-1, size - 1)
    if top.numel() != rest.shape[0]:
        raise ValueError("plane-coded tensor is corrupt: its byte planes disagree in length")
    return torch.cat([rest, top.reshape(-1, 1)], dim=1).reshape(-1).view(dtype).reshape(shape)
