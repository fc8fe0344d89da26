"""WINA (Chen et al., 2025, "Weight Informed Neuron Activation"): keep input channel j of a projection where
|x_j| times the norm of weight column j is large, so a channel's importance is what it contributes to the
output, not its magnitude alone.

|x_j| * ||W[:, j]|| > t  is  |x_j| > t / ||W[:, j]||: one threshold per channel, which the row-skipping kernel
takes as it is. t is calibrated per projection as the `sparsity` quantile of the scores on calibration tokens
(WINA's paper keeps the top-k per token; a calibrated threshold reaches the same sparsity on average and needs
no sort at run time). Projections that read one input keep their own masks (their column norms differ), so
q/k/v each read their own rows. Every projection gets the same sparsity (WINA's uniform setting).
"""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.methods.activations.base import ActivationMethod, check_fraction, quantile_threshold, validate_common
from sparseforge.methods.activations.common_params import RuntimeParams
from sparseforge.methods.base import param, register

NEVER = 3.0e38  # threshold of a channel whose weight column is all zero: it contributes nothing, never read


@dataclasses.dataclass
class WinaParams(RuntimeParams):
    sparsity: float = param(0.5, "fraction of each projection's input channels zeroed per token (on average)")


def column_scaled_threshold(samples: torch.Tensor, weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-channel thresholds [in] such that |x_j| > threshold_j  iff  |x_j| * ||W[:, j]|| > t, with t the
    `sparsity` quantile of those scores over `samples` [tokens, in]."""
    norms = weight.float().norm(dim=0)
    t = quantile_threshold(samples.abs() * norms, sparsity)
    out = torch.full_like(norms, NEVER)
    live = norms > 0
    out[live] = t / norms[live]
    return out


@register
class Wina(ActivationMethod):
    name = "wina"
    summary = "keep inputs whose |x_j| times weight-column norm is large (per-channel thresholds), row-skipping decode kernel"
    Params = WinaParams

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        check_fraction(params.sparsity, f"{where}: " if where else "", "sparsity", 0.9)
        validate_common(params, where)

    @classmethod
    def example_params(cls) -> dict:
        return {"sparsity": 0.5, "gate_token_counts": [1], "gate_repeats": 1}

    def thresholds(self, model, sites, modules):
        s = self.params.sparsity
        return {proj: {"threshold": column_scaled_threshold(site.samples, modules[proj].weight.detach(), s), "sparsity": s, "site": site.name}
                for site in sites for proj in site.projections}
