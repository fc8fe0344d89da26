"""R-Sparse (Zhang et al., ICLR 2025, "R-Sparse: Rank-Aware Activation Sparsity"): W x = W (m ⊙ x) + W ((1-m) ⊙ x),
where the first term reads only the kept channels' rows and the second, the many small channels, is approximated
by a rank-r factorisation of W: y ≈ W (m ⊙ x) + U (V ((1-m) ⊙ x)), U V the best rank-r approximation of W (SVD).

Rank-aware selection: what dropping channel j from the exact product costs is |x_j| times the norm of column j
of the residual R = W - U V (the part the low-rank term cannot stand in for), so channels are kept where
|x_j| * ||R[:, j]|| is large: per-channel thresholds t / ||R[:, j]||, t the `sparsity` quantile of those scores
on calibration tokens. The factors are part of the runtime state (saved with the artifact). The low-rank term
costs r * (in + out) weights read per token: at rank fraction ρ of min(in, out) on a square weight, 2ρ of the
dense product, which the speedup pays for.
"""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.errors import UserInputError
from sparseforge.methods.activations.base import ActivationMethod, check_fraction, validate_common
from sparseforge.methods.activations.common_params import RuntimeParams
from sparseforge.methods.activations.wina import column_scaled_threshold
from sparseforge.methods.base import param, register

EXACT_SVD_MAX = 1024  # above this smaller dimension a randomized SVD (torch.svd_lowrank) is used


@dataclasses.dataclass
class RSparseParams(RuntimeParams):
    sparsity: float = param(0.5, "fraction of each projection's input channels left to the low-rank term per token (on average)")
    rank: float = param(0.05, "rank of the low-rank term, as a fraction of min(out, in) of each projection")


def low_rank(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [out, r], V [r, in]) with U V the best (randomized above EXACT_SVD_MAX) rank-r approximation of weight."""
    w = weight.float()
    if rank == 0:
        return w.new_zeros(w.shape[0], 0), w.new_zeros(0, w.shape[1])
    if min(w.shape) <= EXACT_SVD_MAX:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return (u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous()
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(w, q=min(rank + 10, min(w.shape)), niter=3)
    return (u[:, :rank] * s[:rank]).contiguous(), v[:, :rank].t().contiguous()


@register
class RSparse(ActivationMethod):
    name = "rsparse"
    summary = "sparse large inputs plus a low-rank approximation of the rest (rank-aware channel selection), row-skipping decode kernel"
    Params = RSparseParams

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        w = f"{where}: " if where else ""
        check_fraction(params.sparsity, w, "sparsity", 0.95)
        if not 0.0 <= params.rank <= 1.0:
            raise UserInputError(f"{w}rank {params.rank} must be a fraction of min(out, in) in [0, 1], e.g. 0.05")
        validate_common(params, where)

    @classmethod
    def example_params(cls) -> dict:
        return {"sparsity": 0.5, "rank": 0.1, "gate_token_counts": [1], "gate_repeats": 1}

    def thresholds(self, model, sites, modules):
        p = self.params
        plan = {}
        for site in sites:
            for proj in site.projections:
                w = modules[proj].weight.detach()
                r = int(round(p.rank * min(w.shape)))
                u, v = low_rank(w, r)
                residual = w.float() - u @ v
                plan[proj] = {"threshold": column_scaled_threshold(site.samples, residual, p.sparsity), "sparsity": p.sparsity,
                              "site": site.name, "lowrank": (u.to(w.dtype), v.to(w.dtype)) if r else None}
        return plan

    def report(self, state) -> dict:
        return {**super().report(state), "rank": self.params.rank}
