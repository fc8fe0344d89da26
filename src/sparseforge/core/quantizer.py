"""Uniform integer weight quantization with groups along the input dimension, shared by RTN, GPTQ, SpQR and
the joint prune-and-quantize solver.

A weight row is cut into groups of `group_size` consecutive input columns (0: the whole row, "per channel").
Each group has a float scale s and an integer zero point z; a weight w is stored as the code
q = clamp(round(w / s) + z, 0, 2^bits - 1) and read back as s * (q - z). The range always contains 0, so a
pruned (zero) weight stays exactly zero after quantization, which is what lets sparsity and quantization be
stored together. Symmetric schemes fix z = 2^(bits-1) and s = max|w| / (2^(bits-1) - 1/2), so the signed code
q - z spans [-2^(bits-1), 2^(bits-1) - 1]: the same numbers as compressed-tensors' signed symmetric codes.

`QuantizedWeight` is what a quantizing method leaves behind for storage and kernels: codes, scales, zero
points and the scheme. `dequantize` is the one formula every reader uses, so a reloaded weight is bit-identical
to the one the method wrote into the model.
"""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.errors import UserInputError

BITS = (2, 3, 4, 8)
# The model attribute holding {state key: QuantizedWeight} for projections whose current weight is exactly
# the dequantized codes (checked again at save time).
QUANT_ATTR = "sparseforge_quant"


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    bits: int = 4
    symmetric: bool = True
    group_size: int = 128  # 0: one group per row (per channel)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, cols: int) -> int:
        return 1 if self.group_size == 0 else -(-cols // self.group_size)

    def group_width(self, cols: int) -> int:
        return cols if self.group_size == 0 else self.group_size

    def check(self, where: str = "") -> None:
        if self.bits not in BITS:
            raise UserInputError(f"{where}bits {self.bits} is not supported; choose one of {', '.join(map(str, BITS))}")
        if self.group_size < 0:
            raise UserInputError(f"{where}group_size {self.group_size} must be 0 (per channel) or a positive integer, e.g. 128")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"w{self.bits}{'g' + str(self.group_size) if self.group_size else 'pc'}{'' if self.symmetric else '-asym'}"


def find_params(x: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float tensors holding integers) of each row of `x` [rows, width], min-max."""
    zero_t = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.min(dim=1).values, zero_t)
    xmax = torch.maximum(x.max(dim=1).values, zero_t)
    if scheme.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)  # all-zero rows: any scale works
    scale = (xmax - xmin) / scheme.maxq
    if scheme.symmetric:
        zero = torch.full_like(scale, float((scheme.maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as floats) of `x` for broadcastable scale and zero. A float zero point (SpQR's quantized
    statistics) is split into its nearest integer and the rest, so codes stay integers; for integer zero points
    the rest is +0.0 and this is exactly round(x / s) + z."""
    whole = torch.round(zero)
    return torch.clamp(torch.round(x / scale + (zero - whole)) + whole, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return dequantize(quantize_codes(x, scale, zero, maxq), scale, zero)


def minmax_float_zero(x: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max grid of each row of `x` whose zero point stays a float (SpQR's statistics: the range
    need not contain 0). A constant row v gets scale |v| (1e-8 for 0) and zero -v / scale, so v is code 0 exactly
    and the scale stays of the size of its neighbours (which share a second-level grid with it)."""
    xmin, xmax = x.min(dim=1).values, x.max(dim=1).values
    flat = xmin == xmax
    scale = torch.where(flat, xmin.abs().clamp_min(1e-8), (xmax - xmin) / maxq)
    return scale, -xmin / scale


@dataclasses.dataclass
class StatCodes:
    """Second-level quantization of one per-group statistic (SpQR): the statistic [out, groups] is cut into
    chunks of `group_size` consecutive output rows per column group, each chunk rounded to `bits`-bit codes on
    its own asymmetric min-max grid whose scale and zero are float16. codes [out, groups] uint8; scale and zero
    [chunks, groups] float16."""

    bits: int
    group_size: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def values(self) -> torch.Tensor:
        """The statistic as every reader sees it (float32), the one formula for the solver and storage."""
        s = self.scale.float().repeat_interleave(self.group_size, 0)[: self.codes.shape[0]]
        z = self.zero.float().repeat_interleave(self.group_size, 0)[: self.codes.shape[0]]
        return dequantize(self.codes.float(), s, z)


def quantize_stat(values: torch.Tensor, bits: int, group_size: int) -> StatCodes:
    """`values` [out, groups] float -> its second-level codes (`StatCodes.values()` reads back the rounded values)."""
    rows, groups = values.shape
    chunks = -(-rows // group_size)
    # A short last chunk is padded with its own last row, which leaves its min and max unchanged.
    padded = torch.cat([values, values[-1:].expand(chunks * group_size - rows, groups)]) if chunks * group_size > rows else values
    by_chunk = padded.reshape(chunks, group_size, groups).permute(0, 2, 1).reshape(chunks * groups, group_size)
    scale, _ = minmax_float_zero(by_chunk.float(), 2**bits - 1)
    scale = scale.clamp_min(2**-14)  # float16's smallest normal number: no second-level scale rounds to 0
    zero = -by_chunk.float().min(dim=1).values / scale
    scale, zero = scale.reshape(chunks, groups).half(), zero.reshape(chunks, groups).half()
    s = scale.float().repeat_interleave(group_size, 0)[:rows]
    z = zero.float().repeat_interleave(group_size, 0)[:rows]
    codes = quantize_codes(values.float(), s, z, 2**bits - 1).to(torch.uint8)
    return StatCodes(bits, group_size, codes, scale, zero)


@dataclasses.dataclass
class QuantizedWeight:
    """codes [out, in] uint8 (0..2^bits-1); scale and zero [out, groups] float32 (zero holds integers, except
    when `stats` quantizes it); `outliers` (SpQR, EasyQuant): a sparse COO float tensor [out, in] whose entries
    replace their dequantized weights, or None; `stats` (SpQR): {"scale": StatCodes, "zero": StatCodes (asymmetric
    only)}, the second-level codes whose `values()` are exactly `scale` and `zero`."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scheme: QuantScheme
    outliers: torch.Tensor | None = None
    stats: dict | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def expanded(self, t: torch.Tensor) -> torch.Tensor:
        """Per-group values [out, groups] repeated to one per column [out, in]."""
        cols = self.codes.shape[1]
        return t.repeat_interleave(self.scheme.group_width(cols), dim=1)[:, :cols]

    def dequantize(self) -> torch.Tensor:
        w = dequantize(self.codes.float(), self.expanded(self.scale), self.expanded(self.zero))
        if self.outliers is not None:
            o = self.outliers.coalesce()  # outliers replace their dequantized weights
            w = w.index_put((o.indices()[0], o.indices()[1]), o.values().float())
        return w


def quantize_rtn(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Round to nearest with min-max groups: the data-free baseline."""
    W = weight.detach().float()
    rows, cols = W.shape
    width = scheme.group_width(cols)
    scales, zeros, codes = [], [], []
    for g in range(0, cols, width):
        s, z = find_params(W[:, g : g + width], scheme)
        scales.append(s)
        zeros.append(z)
        codes.append(quantize_codes(W[:, g : g + width], s[:, None], z[:, None], scheme.maxq))
    return QuantizedWeight(torch.cat(codes, 1).to(torch.uint8), torch.stack(scales, 1), torch.stack(zeros, 1), scheme)


def quantized_weights(model) -> dict[str, QuantizedWeight]:
    """{state key: QuantizedWeight} recorded on `model` by quantizing stages (empty when none)."""
    return getattr(model, QUANT_ATTR, None) or {}


def record_quantized(model, entries: dict[str, QuantizedWeight]) -> None:
    setattr(model, QUANT_ATTR, {**quantized_weights(model), **entries})
