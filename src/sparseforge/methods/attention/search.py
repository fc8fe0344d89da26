"""Offline per-head pattern search (MInference's way): on calibration text, every candidate pattern is built for
every head of every layer from the model's real queries and keys, and the share of the head's dense attention mass
it covers is measured. Each head then takes the cheapest candidate (lowest measured density) that covers at least
`target` of its mass, or dense attention where none does. The choice is runtime state (saved with the artifact);
at run time each head's chosen pattern builds its indices online from the prompt, as MInference does."""
from __future__ import annotations

import dataclasses

import torch

from sparseforge.errors import UserInputError
from sparseforge.kernels.block_sparse_attention import BlockSelection
from sparseforge.methods.attention.base import (SparsePrefill, PrefillParams, check_fraction, prefix,
                                                selection_coverage, with_diagonal)
from sparseforge.methods.base import RuntimeState, get_method, param, register

DENSE = -1
DEFAULT_CANDIDATES = [
    "ashape:sinks=64,window=256",
    "ashape:sinks=64,window=512",
    "vertical-slash:vertical=128,slash=256",
    "vertical-slash:vertical=256,slash=512",
    "vertical-slash:vertical=512,slash=768",
    "flexprefill:gamma=0.9",
    "flexprefill:gamma=0.95",
]


@dataclasses.dataclass
class SearchParams(PrefillParams):
    target: float = param(0.95, "share of each head's dense attention mass its chosen pattern must cover on the calibration text")
    max_density: float = param(1.0, "highest density (share of causal blocks) a head's pattern may have on the calibration text; heads no candidate covers within it take the best-covering one that fits")
    candidates: list = param(DEFAULT_CANDIDATES, "patterns tried per head, 'method:key=value,...' (block_size and gate come from this stage)")


def parse_candidate(text: str, block_size: int, where: str = "") -> SparsePrefill:
    name, _, rest = str(text).partition(":")
    raw = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserInputError(f"{where}candidate '{text}': expected key=value, got '{item}'")
        raw[key.strip()] = float(value) if "." in value else int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    cls = get_method(name.strip())
    if not (isinstance(cls, type) and issubclass(cls, SparsePrefill)) or cls is MInferenceSearch:
        raise UserInputError(f"{where}candidate '{text}': '{name}' is not a prefill attention pattern")
    raw.update(block_size=block_size, gate="always")
    return cls(cls.parse_params(raw, where))


class _Probe(SparsePrefill):
    """Measures every candidate on each layer's real attention and lets the dense attention run."""

    name = "_search_probe"

    def __init__(self, candidates, heads: int, layers: int):
        super().__init__(PrefillParams(gate="always"))
        self.candidates = candidates
        self.coverage = torch.zeros(layers, len(candidates), heads, dtype=torch.float64)
        self.density = torch.zeros(layers, len(candidates), heads, dtype=torch.float64)
        self.batches = torch.zeros(layers)

    def run_prefill(self, module, index, q, k, v, scale):
        n = None
        for c, cand in enumerate(self.candidates):
            sel = cand.selection(q, k, scale, index)
            n = sel.q_blocks
            self.coverage[index, c] += selection_coverage(q, k, sel, scale).sum(0).double()
            self.density[index, c] += sel.block_mask().sum((-1, -2)).sum(0).double() / (n * (n + 1) / 2)
        self.batches[index] += q.shape[0]
        return None


@register
class MInferenceSearch(SparsePrefill):
    name = "minference-search"
    summary = "offline per-head search: each head takes the cheapest candidate pattern covering a target share of its dense attention mass"
    Params = SearchParams

    def __init__(self, params=None):
        super().__init__(params)
        self.choice: torch.Tensor | None = None  # [layers, q_heads] candidate index, -1 dense
        self._candidates = None

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        super().validate(params, where)
        check_fraction(params.target, prefix(where), "target")
        check_fraction(params.max_density, prefix(where), "max_density")
        if not params.candidates:
            raise UserInputError(f"{prefix(where)}candidates must list at least one pattern")
        for text in params.candidates:
            parse_candidate(text, params.block_size, prefix(where))

    @classmethod
    def example_params(cls) -> dict:
        return {"block_size": 8, "gate": "always", "kernel": "gather", "target": 0.9,
                "candidates": ["ashape:sinks=8,window=8", "vertical-slash:last_queries=8,vertical=8,slash=8"]}

    def candidates(self) -> list[SparsePrefill]:
        if self._candidates is None:
            self._candidates = [parse_candidate(t, self.params.block_size) for t in self.params.candidates]
        return self._candidates

    def calibrate(self, model, context) -> RuntimeState:
        from sparseforge.core.adapter import ModelAdapter
        from sparseforge.core.calibration import CalibrationConfig, calibration_batches
        from sparseforge.eval.perplexity import max_positions, model_device

        if context is None or context.tokenizer is None:
            raise UserInputError("minference-search calibrates on text and needs the model's tokenizer; pass one to compress")
        config = context.calibration or CalibrationConfig()
        limit = max_positions(model)
        if limit is not None and config.seq_len > limit:
            config = dataclasses.replace(config, seq_len=limit)
        adapter = ModelAdapter(model)
        heads, _ = adapter.head_counts()
        probe = _Probe(self.candidates(), heads, adapter.num_layers)
        device = model_device(model)
        probe.attach(model, RuntimeState())
        try:
            with torch.no_grad():
                for ids in calibration_batches(context.tokenizer, config):
                    model(input_ids=ids.to(device), use_cache=False)
        finally:
            probe.detach(model)
        coverage = (probe.coverage / probe.batches[:, None, None].clamp(min=1)).float()
        density = (probe.density / probe.batches[:, None, None].clamp(min=1)).float()
        choice = choose(coverage, density, self.params.target, self.params.max_density)
        gate = super().calibrate(model, context).data["gate"]
        return RuntimeState(
            tensors={"choice": choice.to(torch.int64)},
            data={"gate": gate, "calibration_length": config.seq_len, "target": self.params.target,
                  "coverage": [[round(float(x), 5) for x in row] for row in coverage.mean(-1)],
                  "head_coverage": _table(coverage, choice), "head_density": _table(density, choice)},
        )

    def load_state(self, state: RuntimeState) -> None:
        super().load_state(state)
        if "choice" not in state.tensors:
            raise UserInputError("minference-search has no per-head choice in its state; run calibrate() (compress does) before attach")
        self.choice = state.tensors["choice"].cpu()

    def select(self, q, k, scale, heads, index):
        b, hq, L, _ = q.shape
        row = self.choice[index][heads.cpu()].to(q.device) if index < len(self.choice) else torch.full((len(heads),), DENSE, device=q.device)
        bs = self.params.block_size
        n = -(-L // bs)
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        mask = causal.expand(b, len(heads), n, n).clone()  # dense heads keep every causal block
        for c, cand in enumerate(self.candidates()):
            rows = (row == c).nonzero().flatten()
            if len(rows):
                mask[:, rows] = with_diagonal(cand.select(q, k, scale, heads[rows], index)).block_mask()
        return BlockSelection.from_block_mask(mask, bs, L)

    def predicted_density(self, q, k, scale, heads, index):
        """Each head's chosen pattern predicts its own density (dense heads: 1); None if one pattern cannot."""
        row = self.choice[index][heads.cpu()] if index < len(self.choice) else torch.full((len(heads),), DENSE)
        out = torch.ones(len(heads), dtype=torch.float64)
        for c, cand in enumerate(self.candidates()):
            rows = (row == c).nonzero().flatten()
            if len(rows):
                guess = cand.predicted_density(q, k, scale, heads[rows.to(heads.device)], index)
                if guess is None:
                    return None
                out[rows] = guess.double().cpu()
        return out

    def report(self, state) -> dict:
        out = super().report(state)
        choice = state.tensors.get("choice")
        if choice is not None:
            names = list(self.params.candidates)
            counts = {"dense": int((choice == DENSE).sum())}
            for c, text in enumerate(names):
                counts[text] = int((choice == c).sum())
            out["heads_per_pattern"] = counts
        return out


def choose(coverage: torch.Tensor, density: torch.Tensor, target: float, max_density: float = 1.0) -> torch.Tensor:
    """Per layer and head (`[layers, candidates, heads]` inputs), the candidate index: the lowest density among those
    covering `target` within `max_density`; else the best-covering one within `max_density`; else dense (-1)."""
    inf = torch.full_like(density, float("inf"))
    fits = density <= max_density
    ok = (coverage >= target) & fits
    cheapest = torch.where(ok, density, inf).argmin(1)
    best_fit = torch.where(fits, coverage, -inf).argmax(1)
    fallback = torch.where(fits.any(1), best_fit, torch.full_like(best_fit, DENSE))
    if max_density >= 1.0:
        fallback = torch.full_like(best_fit, DENSE)  # no cap: a head nothing covers stays dense
    return torch.where(ok.any(1), cheapest, fallback)


def _table(values: torch.Tensor, choice: torch.Tensor) -> list[list[float]]:
    """Per layer and head, the value of the chosen candidate (1.0 for dense heads)."""
    L, _, H = values.shape
    return [[round(float(values[l, choice[l, h], h]) if choice[l, h] >= 0 else 1.0, 5) for h in range(H)] for l in range(L)]
