"""EasyQuant (Tang et al., 2023, "EasyQuant: An Efficient Data-free Quantization Algorithm for LLMs"): no
calibration data. In each output row the `outlier_fraction` largest |w| are kept in 16 bits (a sparse matrix,
as SpQR's outliers), and each group's quantization range for the rest is chosen to minimise that group's
reconstruction error ||w - q(w)||² instead of taking the min-max range.

The paper optimises the scale by gradient descent; a scale is one number per group, so here an exhaustive
search over `grid` shrink factors of the min-max range (1.0 down to `min_shrink`) finds the minimiser at least
as well, deterministically. Codes, scales and integer zero points are the ordinary ones (core/quantizer.py),
so storage and, when no outliers are kept, the kernels read them like RTN's.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from sparseforge.core.obs import ObsResult
from sparseforge.core.quantizer import QuantizedWeight, dequantize, find_params, quantize_codes
from sparseforge.errors import UserInputError
from sparseforge.methods.base import param, register
from sparseforge.methods.weights.quant_base import QuantParams, WeightQuantizer


@dataclasses.dataclass
class EasyQuantParams(QuantParams):
    outlier_fraction: float = param(0.01, "fraction of each output row's weights, the largest |w|, kept in 16 bits as outliers; 0 keeps none")
    grid: int = param(40, "candidate ranges searched per group, evenly spaced shrink factors of the min-max range")
    min_shrink: float = param(0.5, "smallest shrink factor of the min-max range searched, in (0, 1]")


def search_range(x: torch.Tensor, scheme, grid: int, min_shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `x` [rows, width] the (scale, zero) among the min-max range shrunk by each factor in
    linspace(1, min_shrink, grid) with the least squared reconstruction error (the first such on ties, so a full
    range wins when shrinking does not help)."""
    best_err = torch.full((x.shape[0],), math.inf)
    best_s = best_z = None
    for f in torch.linspace(1.0, min_shrink, grid).tolist():
        s, z = find_params(x * f, scheme)
        err = (x - dequantize(quantize_codes(x, s[:, None], z[:, None], scheme.maxq), s[:, None], z[:, None])).pow(2).sum(1)
        if best_s is None:
            best_err, best_s, best_z = err, s, z
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def easyquant(weight: torch.Tensor, scheme, outlier_fraction: float, grid: int, min_shrink: float) -> QuantizedWeight:
    W = weight.detach().float()
    rows, cols = W.shape
    k = min(cols, math.ceil(outlier_fraction * cols)) if outlier_fraction > 0 else 0
    outlier = torch.zeros(rows, cols, dtype=torch.bool)
    if k:
        outlier.scatter_(1, W.abs().topk(k, dim=1).indices, True)
    rest = torch.where(outlier, torch.zeros_like(W), W)  # 0 is on every grid: outliers do not widen the range
    width = scheme.group_width(cols)
    scales, zeros, codes = [], [], []
    for g in range(0, cols, width):
        part = rest[:, g : g + width]
        s, z = search_range(part, scheme, grid, min_shrink)
        scales.append(s)
        zeros.append(z)
        codes.append(quantize_codes(part, s[:, None], z[:, None], scheme.maxq))
    sparse = None
    if k:
        index = outlier.nonzero().t()
        sparse = torch.sparse_coo_tensor(index, W[index[0], index[1]].half().float(), (rows, cols), check_invariants=True).coalesce()
    return QuantizedWeight(torch.cat(codes, 1).to(torch.uint8), torch.stack(scales, 1), torch.stack(zeros, 1), scheme, sparse)


@register
class EasyQuant(WeightQuantizer):
    name = "easyquant"
    summary = "data-free: largest weights per row kept in 16 bits, each group's range searched for least reconstruction error (EasyQuant)"
    Params = EasyQuantParams

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        super().validate(params, where)
        if not 0 <= params.outlier_fraction < 0.5:
            raise UserInputError(f"{where}outlier_fraction {params.outlier_fraction} must be in [0, 0.5), e.g. 0.01")
        if params.grid < 1:
            raise UserInputError(f"{where}grid {params.grid} must be a positive integer, e.g. 40")
        if not 0 < params.min_shrink <= 1:
            raise UserInputError(f"{where}min_shrink {params.min_shrink} must be in (0, 1], e.g. 0.5")

    def quantize_projection(self, weight, stats):
        p = self.params
        qw = easyquant(weight, self.scheme, p.outlier_fraction, p.grid, p.min_shrink)
        return ObsResult(qw.dequantize(), qw)

    def report_quant(self) -> dict:
        p = self.params
        return super().report_quant() | {"outlier_fraction": p.outlier_fraction, "grid": p.grid, "min_shrink": p.min_shrink}
