"""The optimal-brain-surgeon (OBS) column solver that SparseGPT and GPTQ share.

Columns of W [out, in] are fixed left to right. Fixing column j to q_j (zero where it is pruned, its rounded
value where it is quantized, both where both apply) leaves the error e = (w_j - q_j) / [H⁻¹]_jj, which the
columns not yet fixed absorb as W[:, j:] -= e · U[j, j:], U the upper Cholesky factor of H⁻¹ and H = XᵀX
(+ damping) the Hessian of the layer's reconstruction loss. Blocked ("lazy batch"): inside a block of
`blocksize` columns the update runs column by column; the block's whole error reaches the columns after it in
one matrix product. Either step may be off: prune only is SparseGPT, quantize only is GPTQ, both is the joint
method of the SparseGPT paper (quantizer inside the pruning loop, as IST-DASLab's reference code does).

Selection (prune) per block, as SparseGPT: unstructured picks the block's lowest w² / [H⁻¹]_jj² over all its
rows with counts that keep the running total at floor(sparsity · numel); N:M picks per row within each group
of M columns when the solver reaches the group. Rounding (quantize): a group's scale and zero point are found
when the solver reaches the group's first column, on the weights as updated so far (pruned ones zeroed), so a
group never straddles a block (the block size is rounded to a multiple of the group size). With activation
order (GPTQ's act-order) columns are visited by decreasing H_jj; the groups stay the original consecutive
columns and take their parameters from the weights before any update ("static groups"), so storage and kernels
see ordinary groups.

Two hooks serve SpQR (methods/weights/spqr.py) and leave SparseGPT and GPTQ untouched when unset: `fit_group`
replaces the min-max group fit (SpQR: leave-one-out outlier pre-selection and second-level quantized statistics),
and `outlier_threshold` turns on SpQR's outliers: a weight whose OBS error of rounding, (w - q(w))² / [H⁻¹]_jj²
(the Cholesky diagonal, as the update uses), exceeds tau = outlier_threshold · mean_j(var_i W_ij / [H⁻¹]_jj²)
(the layer's typical such error, from the weights before the walk) keeps its value in float16 and is recorded.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from sparseforge.core.masks import Pattern, prune_count
from sparseforge.core.quantizer import QuantScheme, QuantizedWeight, dequantize, find_params, quantize_codes
from sparseforge.errors import UserInputError


@dataclasses.dataclass
class ObsResult:
    weight: torch.Tensor  # float32 [out, in]: pruned and/or dequantized
    quantized: QuantizedWeight | None = None
    # With outliers on: each weight's (w - q(w))² / [H⁻¹]_jj² when its column was reached, and the threshold.
    sensitivity: torch.Tensor | None = None
    outlier_tau: float | None = None


# (group index, the group's weights [rows, width] as updated so far, their columns' [H⁻¹]_jj, tau or None)
#   -> (scale, zero) [rows]
GroupFit = Callable[[int, torch.Tensor, torch.Tensor, "float | None"], "tuple[torch.Tensor, torch.Tensor]"]


def obs_solve(weight: torch.Tensor, hessian: torch.Tensor, prune: Pattern | None = None, quant: QuantScheme | None = None,
              blocksize: int = 128, dampening: float = 0.01, act_order: bool = False, outlier_threshold: float | None = None,
              fit_group: GroupFit | None = None) -> ObsResult:
    """Prune and/or quantize `weight` ([out, in], any float dtype; computed in float32) against `hessian` [in, in].
    `outlier_threshold` and `fit_group` (quantizing only, no act_order): SpQR's hooks, see the module docstring;
    outliers keep their value (as updated when reached, rounded to float16) and add no error."""
    # A contiguous copy: GPT-2's Conv1D hands over a transposed view, whose strides clone() would keep, and
    # the flat mask indexing below needs row-major blocks.
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    rows, cols = W.shape
    if prune is not None and prune.kind == "nm":
        if cols % prune.m:
            raise UserInputError(f"input dimension {cols} is not a multiple of M={prune.m}; ignore this layer or pick another M")
        if blocksize % prune.m:
            blocksize = max(prune.m, blocksize // prune.m * prune.m)  # N:M groups must not straddle blocks
    if quant is not None and quant.group_size:
        if prune is not None and prune.kind == "nm" and quant.group_size % prune.m:
            raise UserInputError(f"group_size {quant.group_size} is not a multiple of M={prune.m}; pick e.g. 128")
        blocksize = max(1, blocksize // quant.group_size) * quant.group_size  # a group never straddles a block
    if (outlier_threshold is not None or fit_group is not None) and (quant is None or act_order):
        raise UserInputError("outliers and custom group fits need quantization without act_order")
    if act_order and prune is not None:
        raise UserInputError("act_order reorders columns, which the pruning step's per-block selection cannot follow; "
                             "use act_order without pruning")
    H = hessian.detach().clone().float().to(W.device)
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do nothing
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += dampening * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)

    width = quant.group_width(cols) if quant is not None else cols
    n_groups = quant.groups(cols) if quant is not None else 0
    scale = torch.zeros(rows, n_groups, device=W.device)
    zero = torch.zeros(rows, n_groups, device=W.device)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device) if quant is not None else None
    outlier = torch.zeros(rows, cols, dtype=torch.bool, device=W.device) if outlier_threshold is not None else None
    sensitivity = torch.zeros(rows, cols, device=W.device) if outlier_threshold is not None else None
    if fit_group is None and quant is not None:
        fit_group = lambda g, part, diag, tau: find_params(part, quant)  # noqa: E731  (plain min-max)
    perm = None
    if act_order and quant is not None:
        for g in range(n_groups):  # static groups: parameters from the weights before any update
            scale[:, g], zero[:, g] = find_params(W[:, g * width : (g + 1) * width], quant)
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    # Upper Cholesky factor of H⁻¹: row j holds what the OBS update needs after column j is fixed.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    diag = torch.diag(Hinv)
    tau = None
    if outlier_threshold is not None:
        tau = outlier_threshold * float((W.var(dim=0, unbiased=False) / diag**2).mean())

    target_total = prune_count(rows * cols, prune.sparsity) if prune is not None else 0
    pruned_total = 0
    for b1 in range(0, cols, blocksize):
        b2 = min(b1 + blocksize, cols)
        W1 = W[:, b1:b2].clone()
        Hinv1 = Hinv[b1:b2, b1:b2]
        Err1 = torch.zeros_like(W1)
        mask = torch.zeros_like(W1, dtype=torch.bool)
        if prune is not None and prune.kind == "unstructured":
            # Exact count for this slab such that the running total tracks floor(sparsity * numel so far).
            k = prune_count(rows * b2, prune.sparsity) - pruned_total if b2 < cols else target_total - pruned_total
            if k > 0:
                scores = (W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2).flatten()
                order = torch.argsort(scores, stable=True)
                mask.view(-1)[order[:k]] = True
            pruned_total += max(k, 0)
        for i in range(b2 - b1):
            if prune is not None and prune.kind == "nm" and i % prune.m == 0:
                group = W1[:, i : i + prune.m] ** 2 / torch.diag(Hinv1)[i : i + prune.m].reshape(1, -1) ** 2
                order = torch.argsort(group, dim=1, stable=True)
                mask[:, i : i + prune.m].scatter_(1, order[:, : prune.m - prune.n], True)
            w = W1[:, i]
            d = Hinv1[i, i]
            q = torch.where(mask[:, i], torch.zeros_like(w), w) if prune is not None else w
            if quant is not None:
                col = b1 + i if perm is None else int(perm[b1 + i])
                g = col // width
                if perm is None and col % width == 0:
                    part = torch.where(mask[:, i : i + width], torch.zeros_like(W1[:, i : i + width]), W1[:, i : i + width])
                    if col + width > b2:  # a per-channel group spans every block: the rest of the row counts too
                        part = torch.cat([part, W[:, b2 : col + width]], 1)
                    scale[:, g], zero[:, g] = fit_group(g, part, diag[col : col + width], tau)
                if outlier is not None:
                    c = quantize_codes(q, scale[:, g], zero[:, g], quant.maxq)
                    sens = ((q - dequantize(c, scale[:, g], zero[:, g])) / d) ** 2
                    out = sens > tau
                    sensitivity[:, col], outlier[:, col] = sens, out
                    # An outlier's code is that of 0 (storage needs one; its 16-bit value replaces it).
                    c = torch.where(out, quantize_codes(torch.zeros_like(q), scale[:, g], zero[:, g], quant.maxq), c)
                    q = torch.where(out, q.half().float(), dequantize(c, scale[:, g], zero[:, g]))
                else:
                    c = quantize_codes(q, scale[:, g], zero[:, g], quant.maxq)
                    q = dequantize(c, scale[:, g], zero[:, g])
                codes[:, col] = c.to(torch.uint8)
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q  # exactly the pruned zero / dequantized value, whatever rounding the update left
            Err1[:, i] = err
        W[:, b1:b2] = W1
        W[:, b2:] -= Err1 @ Hinv[b1:b2, b2:]
    if perm is not None:
        W = W[:, torch.argsort(perm)]
    quantized = None
    if quant is not None:
        sparse_outliers = None
        if outlier is not None and bool(outlier.any()):
            index = outlier.nonzero().t()
            sparse_outliers = torch.sparse_coo_tensor(index, W[index[0], index[1]], (rows, cols), check_invariants=True).coalesce().cpu()
        quantized = QuantizedWeight(codes.cpu(), scale.cpu(), zero.cpu(), quant, sparse_outliers)
    return ObsResult(W, quantized, sensitivity, tau)
