"""SpQR (Dettmers et al., 2023, "SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight
Compression"): GPTQ with small groups (default 16 columns) whose statistics are themselves quantized, and the
few weights that rounding would hurt most kept in 16 bits in a sparse matrix.

- Group statistics: each group's min-max scale and (float) zero point, per output row; then, per column group,
  the scales of `stat_group_size` consecutive rows share one `stat_bits`-bit asymmetric grid with float16 scale
  and zero, and so do the zero points (symmetric schemes have no zero point to store). The solver rounds with
  the read-back statistics, so the stored ones are exactly those used.
- Outliers, by the paper's Hessian criterion (core/obs.py's `outlier_threshold` hook): when the OBS walk
  reaches a weight, its sensitivity (w - q(w))² / [H⁻¹]_jj² above tau = `outlier_threshold` times the layer's
  mean of var_i(W_ij) / [H⁻¹]_jj² makes it an outlier, kept in float16 (no error to propagate).
- Before fitting a group, weights whose leave-one-out gain exceeds tau (the drop in the group's Hessian-weighted
  rounding error if that one weight were left out of the min-max fit) are replaced by the mean of the others
  for the fit only, so likely outliers do not widen the grid of the rest (the reference code's
  `get_leave_one_out_error`, written here in our own vectorised form).
Not done: the paper's column permutation (act-order) with these groups.
"""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.core.obs import obs_solve
from sparseforge.core.quantizer import QuantScheme, StatCodes, fake_quantize, find_params, minmax_float_zero, quantize_stat
from sparseforge.errors import UserInputError
from sparseforge.methods.base import param, register
from sparseforge.methods.weights.gptq import check_solver_params
from sparseforge.methods.weights.quant_base import QuantParams, WeightQuantizer


@dataclasses.dataclass
class SpQRParams(QuantParams):
    bits: int = param(3, "bits per weight code: 2, 3, 4 or 8")
    group_size: int = param(16, "input columns sharing one scale and zero point (SpQR uses small groups, e.g. 16)")
    symmetric: bool = param(False, "symmetric codes; SpQR's default is asymmetric with a quantized zero point")
    outlier_threshold: float = param(0.2, "a weight whose OBS rounding error exceeds this multiple of the layer's mean is an outlier, kept in 16 bits")
    stat_bits: int = param(3, "bits of the second-level codes of the group scales and zero points (0: keep them float32)")
    stat_group_size: int = param(16, "output rows sharing one second-level grid for their group statistics")
    blocksize: int = param(128, "columns quantized together before their error reaches the rest (rounded to whole groups)")
    dampening: float = param(0.01, "fraction of the mean Hessian diagonal added to the diagonal for stability")


def first_level(part: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero of each row of `part` [rows, width]; asymmetric zero points stay floats."""
    if symmetric:
        return find_params(part, QuantScheme(bits, True, 0))
    return minmax_float_zero(part, 2**bits - 1)


def leave_one_out_gain(part: torch.Tensor, diag: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """[rows, width]: how much the group's Hessian-weighted rounding error sum_j ((w_j - q(w_j)) / d_j)² falls
    when weight k is left out of the min-max fit (and not rounded)."""
    rows, width = part.shape
    maxq = 2**bits - 1
    base_s, base_z = first_level(part, bits, symmetric)
    base = ((part - fake_quantize(part, base_s[:, None], base_z[:, None], maxq)) / diag).pow(2).sum(1, keepdim=True)
    # others[k] = the width - 1 columns other than k
    idx = torch.arange(width)
    others = torch.stack([torch.cat([idx[:k], idx[k + 1 :]]) for k in range(width)])  # [width, width - 1]
    loo = part[:, others].reshape(rows * width, width - 1)  # row r, left-out k -> its others
    s, z = first_level(loo, bits, symmetric)
    err = ((loo - fake_quantize(loo, s[:, None], z[:, None], maxq)) / diag[others].repeat(rows, 1)).pow(2).sum(1)
    return base - err.reshape(rows, width)


class SpQRFit:
    """The `fit_group` hook for one projection; remembers each group's second-level codes for storage."""

    def __init__(self, params: SpQRParams):
        self.p = params
        self.scale_codes: dict[int, object] = {}
        self.zero_codes: dict[int, object] = {}

    def __call__(self, g: int, part: torch.Tensor, diag: torch.Tensor, tau: float | None):
        p = self.p
        fit = part
        if tau is not None and part.shape[1] > 1:
            likely = leave_one_out_gain(part, diag, p.bits, p.symmetric) > tau
            keep = (~likely).float()
            mean = (part * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
            fit = torch.where(likely, mean, part)
        scale, zero = first_level(fit, p.bits, p.symmetric)
        if p.stat_bits:
            sc = quantize_stat(scale[:, None], p.stat_bits, p.stat_group_size)
            self.scale_codes[g] = sc
            scale = sc.values()[:, 0]
            if not p.symmetric:
                zc = quantize_stat(zero[:, None], p.stat_bits, p.stat_group_size)
                self.zero_codes[g] = zc
                zero = zc.values()[:, 0]
        return scale, zero

    def stats(self, groups: int) -> dict | None:
        """{"scale": StatCodes, "zero": StatCodes} over all groups, concatenated along the group axis."""
        if not self.p.stat_bits:
            return None

        def join(d):
            parts = [d[g] for g in range(groups)]
            return StatCodes(parts[0].bits, parts[0].group_size, torch.cat([c.codes for c in parts], 1),
                             torch.cat([c.scale for c in parts], 1), torch.cat([c.zero for c in parts], 1))

        out = {"scale": join(self.scale_codes)}
        if not self.p.symmetric:
            out["zero"] = join(self.zero_codes)
        return out


@register
class SpQR(WeightQuantizer):
    name = "spqr"
    summary = "GPTQ with small groups, 3-bit quantized group statistics and Hessian-sensitive outliers kept in 16 bits (SpQR)"
    Params = SpQRParams
    needs_stats = ("hessian",)

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        super().validate(params, where)
        check_solver_params(params, where)
        if not params.outlier_threshold > 0:
            raise UserInputError(f"{where}outlier_threshold {params.outlier_threshold} must be positive, e.g. 0.2")
        if params.group_size == 0:
            raise UserInputError(f"{where}spqr needs groups (group_size > 0, e.g. 16): statistics are per group")
        if params.stat_bits not in (0, 2, 3, 4, 8):
            raise UserInputError(f"{where}stat_bits {params.stat_bits} must be 0 (float32 statistics) or one of 2, 3, 4, 8")
        if params.stat_group_size < 1:
            raise UserInputError(f"{where}stat_group_size {params.stat_group_size} must be a positive integer, e.g. 16")

    def quantize_projection(self, weight, stats):
        p = self.params
        fit = SpQRFit(p)
        result = obs_solve(weight, stats.hessian, quant=self.scheme, blocksize=p.blocksize, dampening=p.dampening,
                           outlier_threshold=p.outlier_threshold, fit_group=fit)
        result.quantized.stats = fit.stats(self.scheme.groups(weight.shape[1]))
        return result

    def report_quant(self) -> dict:
        p = self.params
        return super().report_quant() | {"outlier_threshold": p.outlier_threshold, "stat_bits": p.stat_bits, "stat_group_size": p.stat_group_size}
