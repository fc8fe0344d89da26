"""TEAL (Liu et al., 2024, "Training-Free Activation Sparsity in Large Language Models"): zero the entries of the
hidden state entering each projection whose magnitude is below a threshold calibrated from that input's |x|
distribution, and spread the sparsity over a layer's input sites greedily.

One threshold per input site (the tensor q/k/v read, the one gate/up read, o's input, down's input). The
allocation within each decoder layer is TEAL's greedy block-wise search: start every site dense, then repeatedly
raise by one step the site whose step costs the least output error per parameter it sparsifies, until the
layer's parameter-weighted sparsity reaches the target; the last step is trimmed so the target is met exactly.
Our error is the relative squared error of each projection's output on calibration tokens, summed over the
projections reading the site (TEAL's own search measures the whole block's output; ours needs one product per
projection and step instead of a block forward, and decides the same thing when projections are independent).
"""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.errors import UserInputError
from sparseforge.methods.activations.base import ActivationMethod, check_fraction, validate_common
from sparseforge.methods.activations.common_params import RuntimeParams
from sparseforge.methods.base import param, register

MAX_SITE_SPARSITY = 0.95
ERROR_TOKENS = 256  # calibration tokens per site on which the greedy search measures output error


@dataclasses.dataclass
class TealParams(RuntimeParams):
    sparsity: float = param(0.5, "model-wide fraction of projection inputs zeroed, weighted by each projection's parameter count")
    allocation: str = param("greedy", "how a layer's sparsity is spread over its input sites: greedy (TEAL) or uniform", ("greedy", "uniform"))
    allocation_step: float = param(0.05, "sparsity step of the greedy search")


def relative_error(x: torch.Tensor, dropped: torch.Tensor, weights: list[torch.Tensor]) -> float:
    """sum over projections of ||dropped Wᵀ||² / ||x Wᵀ||²: the output error of zeroing `dropped` out of x."""
    total = 0.0
    for w in weights:
        w = w.float()
        total += float((dropped @ w.t()).pow(2).sum() / (x @ w.t()).pow(2).sum().clamp_min(1e-30))
    return total


def greedy_allocation(sites, sizes: dict[str, int], weights: dict[str, torch.Tensor], target: float, step: float) -> dict[str, float]:
    """{site name: sparsity} for one layer's sites, parameter-weighted mean equal to `target`."""
    if target <= 0:
        return {s.name: 0.0 for s in sites}
    params = {s.name: s.params(sizes) for s in sites}
    total = sum(params.values())
    levels = {s.name: 0 for s in sites}
    cache: dict[tuple[str, int], float] = {}
    by_name = {s.name: s for s in sites}
    max_level = int(MAX_SITE_SPARSITY / step + 1e-9)

    def err(name: str, level: int) -> float:
        if (name, level) not in cache:
            s = by_name[name]
            x = s.samples[:ERROR_TOKENS]
            if level == 0:
                cache[(name, level)] = 0.0
            else:
                t = s.threshold(level * step)
                cache[(name, level)] = relative_error(x, x * (x.abs() <= t), [weights[p] for p in s.projections])
        return cache[(name, level)]

    def achieved() -> float:
        return sum(params[n] * levels[n] * step for n in levels) / total

    last = None
    while achieved() < target - 1e-12:
        open_sites = [n for n in levels if levels[n] < max_level]
        if not open_sites:
            break
        last = min(open_sites, key=lambda n: (err(n, levels[n] + 1) - err(n, levels[n])) / params[n])
        levels[last] += 1
    out = {n: levels[n] * step for n in levels}
    if last is not None:  # trim the last step so the layer meets the target exactly
        excess = achieved() - target
        out[last] = max(0.0, out[last] - excess * total / params[last])
    return out


@register
class Teal(ActivationMethod):
    name = "teal"
    summary = "zero small-magnitude inputs of every projection (thresholds per input site, greedy allocation), row-skipping decode kernel"
    Params = TealParams

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        w = f"{where}: " if where else ""
        check_fraction(params.sparsity, w, "sparsity", 0.9)
        if not 0.005 <= params.allocation_step <= 0.25:
            raise UserInputError(f"{w}allocation_step {params.allocation_step} must be in [0.005, 0.25], e.g. 0.05")
        validate_common(params, where)

    @classmethod
    def example_params(cls) -> dict:
        return {"sparsity": 0.5, "gate_token_counts": [1], "gate_repeats": 1}

    def thresholds(self, model, sites, modules):
        p = self.params
        sizes = {n: m.weight.numel() for n, m in modules.items()}
        weights = {n: m.weight.detach() for n, m in modules.items()}
        sparsity: dict[str, float] = {}
        for layer in sorted({s.layer for s in sites}):
            in_layer = [s for s in sites if s.layer == layer]
            if p.allocation == "greedy":
                sparsity.update(greedy_allocation(in_layer, sizes, weights, p.sparsity, p.allocation_step))
            else:
                sparsity.update({s.name: p.sparsity for s in in_layer})
        plan = {}
        for s in sites:
            t = s.threshold(sparsity[s.name])
            for proj in s.projections:
                plan[proj] = {"threshold": torch.full((modules[proj].in_features,), t), "sparsity": sparsity[s.name], "site": s.name}
        return plan
