"""Layer-by-layer calibration.

1. Run the model's embedding part on the calibration batches and capture what enters decoder layer 0
   (hidden states plus the keyword arguments the model passes: masks, position ids, rotary embeddings).
2. For each layer i in order: move it to the compute device, run it on the captured inputs while forward
   hooks accumulate statistics of each targeted projection's input, let the method change the layer,
   then run the (changed) layer again to produce the inputs of layer i+1, and move it back.

Only one decoder layer and its activations sit on the compute device at a time; with a disk-offloaded model
(core.offload) only that layer is in memory at all. Passing the changed
layer's outputs on (the default, `propagate="pruned"`) lets later layers correct for earlier changes, as
SparseGPT and Wanda do; `propagate="dense"` feeds every layer the dense model's activations instead.

Mixture-of-experts layers (core.moe) are calibrated per expert: while the layer runs, a RoutingRecorder keeps
which experts each calibration token is routed to, and each expert's projections get the statistics of its own
tokens only (the gate/up input: the routed hidden states; the down input: act(gate x) * up x on them, computed
from the expert's weights as they are when the method reaches that projection). Fused stacks `[E, out, in]`
hand methods an `ExpertStack` (one InputStats per expert); per-expert nn.Linear experts get their own InputStats
under their own names. An expert routed fewer than `min_expert_tokens` tokens falls back to every token that
entered the block, pushed through its own weights (its input distribution before routing); the walk reports
each expert's token count and every fallback (docs/methods/moe_calibration.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseforge.core.adapter import ModelAdapter, Projection
from sparseforge.core.moe import MoEBlock, RoutingRecorder, find_moe_blocks
from sparseforge.core.offload import offload_store
from sparseforge.errors import UserInputError


@dataclasses.dataclass
class CalibrationConfig:
    samples: int = 32
    seq_len: int = 512
    source: str = "calibration"  # a bundled split ("calibration", "heldout") or a path to a UTF-8 text file
    seed: int = 0
    propagate: str = "pruned"  # which outputs feed the next layer: "pruned" or "dense"
    device: str | None = None  # compute device; default: where the model's embeddings are
    # An MoE expert routed fewer calibration tokens than this takes the statistics of all tokens entering its block.
    min_expert_tokens: int = 16
    # Weight each routed token's row by its routing weight in the expert's statistics (the block scales the
    # expert's output by it); off by default, measured in docs/methods/moe_calibration.md.
    routing_weighted: bool = False

    def validate(self) -> None:
        if self.samples < 1 or self.seq_len < 2:
            raise UserInputError(f"calibration needs samples >= 1 and seq_len >= 2, got {self.samples} and {self.seq_len}")
        if not isinstance(self.min_expert_tokens, int) or self.min_expert_tokens < 1:
            raise UserInputError(f"calibration min_expert_tokens={self.min_expert_tokens!r} must be an integer >= 1, e.g. 16")
        if not isinstance(self.routing_weighted, bool):
            raise UserInputError(f"calibration routing_weighted={self.routing_weighted!r} must be true or false")
        if self.propagate not in ("pruned", "dense"):
            raise UserInputError(f"calibration propagate={self.propagate!r}; allowed: pruned, dense")


def available_memory_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory the process can still take on `device`: free GPU memory, or the kernel's MemAvailable on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def calibration_activation_bytes(model: nn.Module, config: CalibrationConfig) -> int:
    """What the layer-by-layer walk holds at once: the captured inputs of one layer and its outputs (a third copy
    with propagate="dense"), each samples x seq_len x hidden values in the model's dtype, plus the token ids."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(text_config, "hidden_size", None) or getattr(text_config, "n_embd", None) or 0
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    element = emb.weight.element_size() if emb is not None else 4
    copies = 3 if config.propagate == "dense" else 2
    try:
        copies += bool(find_moe_blocks(model))  # the routing recorder keeps each MoE layer's input once more
    except (ValueError, UserInputError):
        pass
    return config.samples * config.seq_len * (hidden * element * copies + 8)


def check_calibration_memory(model: nn.Module, config: CalibrationConfig) -> int:
    """Refuse, before anything is allocated, calibration settings whose activations cannot fit in memory."""
    config.validate()
    need = calibration_activation_bytes(model, config)
    device = config.device or _model_device(model)
    have = available_memory_bytes(device)
    if have is not None and need > 0.9 * have:
        raise UserInputError(
            f"calibration would hold about {need / 1e9:.2f} GB of activations (samples={config.samples} x seq_len={config.seq_len} "
            f"x hidden size, {'3' if config.propagate == 'dense' else '2'} copies), more than the {have / 1e9:.2f} GB available "
            f"on {torch.device(device).type}; lower calibration samples or seq_len"
        )
    return need


def calibration_batches(tokenizer, config: CalibrationConfig) -> list[torch.Tensor]:
    """`samples` windows of `seq_len` tokens at seeded random offsets in the source text, each `[1, seq_len]`."""
    from sparseforge.data import read_text

    config.validate()
    ids = tokenizer(read_text(config.source), add_special_tokens=False)["input_ids"]
    if len(ids) <= config.seq_len:
        raise UserInputError(
            f"calibration text has {len(ids)} tokens, fewer than seq_len={config.seq_len}; use a longer text or a shorter seq_len"
        )
    rng = random.Random(config.seed)
    starts = [rng.randrange(0, len(ids) - config.seq_len) for _ in range(config.samples)]
    return [torch.tensor([ids[s : s + config.seq_len]]) for s in starts]


class InputStats:
    """Running statistics of one projection's input `x` (rows are tokens, columns input features)."""

    def __init__(self, in_features: int, device, hessian: bool):
        self.n_tokens = 0
        self.col_sq_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.col_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.n_tokens += x.shape[0]
        self.col_sq_sum += (x * x).sum(0)
        self.col_sum += x.sum(0)
        if self.hessian is not None:
            self.hessian += x.t() @ x

    @property
    def col_mean(self) -> torch.Tensor:
        """E[x_j] over calibration tokens (DSnoT's expected-error statistic)."""
        return self.col_sum / max(self.n_tokens, 1)

    @property
    def col_var(self) -> torch.Tensor:
        """Var[x_j] over calibration tokens (population variance; DSnoT divides its regrowth score by it)."""
        n = max(self.n_tokens, 1)
        return (self.col_sq_sum / n - self.col_mean**2).clamp_min(0.0)

    @property
    def col_norm(self) -> torch.Tensor:
        """||x_j||_2 over all calibration tokens (Wanda's activation norm)."""
        return self.col_sq_sum.sqrt()


class ExpertInputs:
    """Per-expert input statistics of one MoE block, from the routing its layer's calibration pass recorded.

    Built lazily, one expert at a time, so only that expert's statistics (an [H, H] and an [I, I] Hessian) are
    held, not all E experts' at once. The down projection's input act(gate x) * up x is computed from the
    expert's weights when a method first asks for it: after the method has changed that expert's gate/up (they
    come first in module order), so the down projection is fitted to the inputs it will really see."""

    def __init__(self, block: MoEBlock, recorder: RoutingRecorder, min_tokens: int, device, hessian: bool, weighted: bool = False):
        self.block, self.device, self.hessian, self.weighted = block, device, hessian, weighted
        self.calls = recorder.calls[block.layer_index]
        self.tokens = [int(n) for n in recorder.counts[block.layer_index]]
        self.min_tokens = min_tokens
        self.fallback = [e for e, n in enumerate(self.tokens) if n < min_tokens]
        self._cache: dict[tuple[int, str], InputStats] = {}

    def stats(self, expert: int, role: str) -> InputStats:
        key = (expert, role)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] == expert}  # keep one expert's at a time
            self._cache[key] = self._compute(expert, role)
        return self._cache[key]

    @torch.no_grad()
    def _compute(self, expert: int, role: str) -> InputStats:
        b = self.block
        width = b.hidden_size if role == "in" else b.intermediate_size
        stats = InputStats(width, self.device, hessian=self.hessian)
        starved = expert in self.fallback
        for hidden, index, weights in self.calls:
            # By default unweighted by the routing weight, as a hook on a per-expert nn.Linear sees it (see the docs).
            routed = (index == expert).any(-1)
            x = hidden if starved else hidden[routed]
            if not x.shape[0]:
                continue
            rows = x if role == "in" else b.expert_intermediate(expert, x)
            if self.weighted and not starved:
                # The down projection is linear, so scaling its input rows scales its output exactly; for gate/up
                # this weights each token's contribution the same way (a first-order stand-in).
                rows = rows * (weights * (index == expert)).sum(-1)[routed].unsqueeze(-1).to(rows.dtype)
            stats.add_batch(rows)
        return stats

    def report(self) -> dict:
        return {"tokens": self.tokens, "fallback": self.fallback}


@dataclasses.dataclass
class ExpertStack:
    """The statistics of a fused expert weight `[E, out, in]`: `expert(e)` gives expert e's InputStats."""

    inputs: ExpertInputs
    role: str

    @property
    def num_experts(self) -> int:
        return self.inputs.block.num_experts

    def expert(self, e: int) -> InputStats:
        return self.inputs.stats(e, self.role)


class LayerStats(Mapping):
    """{projection name: statistics} of one layer; MoE experts' entries are computed when first looked up."""

    def __init__(self, plain: dict[str, InputStats], experts: dict[str, Callable[[], object]]):
        self._plain, self._experts = plain, experts

    def __getitem__(self, name):
        if name in self._plain:
            return self._plain[name]
        return self._experts[name]()

    def __iter__(self):
        return iter({**self._plain, **self._experts})

    def __len__(self) -> int:
        return len(self._plain) + len(self._experts)


def matrices(weight: torch.Tensor, stats):
    """(expert index or None, 2-D weight view, its statistics) for a weight `[out, in]` or a stack `[E, out, in]`,
    so a method treats a fused expert stack as E matrices, each with its own expert's statistics."""
    if weight.dim() == 2:
        return [(None, weight, stats)]
    return [(e, weight[e], stats.expert(e) if stats is not None else None) for e in range(weight.shape[0])]


def _expert_roles(block: MoEBlock, projections: dict[str, Projection]) -> dict[str, tuple[int | None, str]]:
    """{projection name: (expert or None for a fused stack, role)} for the block's expert weights among
    `projections`; a fused parameter other than gate_up_proj / down_proj is refused (its inputs are unknown)."""
    found: dict[str, tuple[int | None, str]] = {}
    if block.fused:
        for name, proj in projections.items():
            if proj.kind == "experts" and proj.module is block.experts:
                role = {"gate_up_proj": "in", "down_proj": "down"}.get(proj.param_name)
                if role is None:
                    raise UserInputError(f"'{name}' is a fused expert weight whose per-expert inputs sparseforge cannot tell; "
                                         "add it to the stage's ignore list or use magnitude for it")
                found[name] = (None, role)
        return found
    by_param = {}
    for e in range(block.num_experts):
        for role_name, w in block.expert_weights(e).items():
            by_param[id(w)] = (e, "down" if role_name == "down" else "in")
    for name, proj in projections.items():
        hit = by_param.get(id(proj.parameter))
        if hit is not None:
            found[name] = hit
    return found


class _StopForward(Exception):
    pass


def _model_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.device if emb is not None else next(model.parameters()).device


def capture_layer_inputs(model: nn.Module, adapter: ModelAdapter, batches, device) -> list[tuple[tuple, dict]]:
    """Positional and keyword inputs of decoder layer 0, one entry per batch."""
    captured: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = adapter.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError("decoder layer 0 was not reached while capturing calibration inputs")
    return captured


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _run_layer(layer: nn.Module, inputs, keep: bool = True, after_each: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """The layer's outputs for every captured input (keep=False: run it for its hooks only, keep nothing)."""
    outs = []
    with torch.inference_mode():
        for args, kwargs in inputs:
            out = layer(*args, **kwargs)
            if keep:
                outs.append(out[0] if isinstance(out, (tuple, list)) else out)
            if after_each is not None:
                after_each()
    return outs


class _StatsCollector:
    """Input statistics of a layer's projections, accumulated once per distinct input tensor: projections that
    read the same tensor (q/k/v, gate/up in most decoders) share one InputStats object, which saves their
    repeated XᵀX work and memory. Which ones share is learned in the first batch by tensor identity (the
    tensors are held until the batch ends, so an id cannot be reused by another tensor meanwhile)."""

    def __init__(self, device, hessian: bool):
        self.device, self.hessian = device, hessian
        self.stats: dict[str, InputStats] = {}
        self.aliases: set[str] = set()
        self._first_batch = True
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}

    def hook(self, name: str, in_features: int):
        def observe(module, args, output):
            x = args[0]
            if self._first_batch:
                hit = self._seen.get(id(x))
                if hit is not None and hit[0] is x:
                    self.stats[name] = self.stats[hit[1]]
                    self.aliases.add(name)
                    return
                self._seen[id(x)] = (x, name)
                self.stats[name] = InputStats(in_features, self.device, hessian=self.hessian)
            elif name in self.aliases:
                return
            self.stats[name].add_batch(x)

        return observe

    def end_batch(self) -> None:
        self._first_batch = False
        self._seen.clear()


LayerFn = Callable[[int, nn.Module, dict[str, Projection], dict[str, InputStats]], None]


def run_layerwise(
    model: nn.Module,
    layer_fn: LayerFn,
    targets=("*",),
    ignore=(),
    batches: list[torch.Tensor] | None = None,
    stats: tuple[str, ...] = (),
    config: CalibrationConfig | None = None,
    progress: bool = True,
    desc: str = "layers",
) -> dict | None:
    """Walk the decoder layers in order, calling `layer_fn(index, layer, projections, stats)` on each.

    `stats` names what the method needs per projection input: "col_norm" and/or "hessian". With no stats
    and no batches, no forward pass runs (e.g. magnitude pruning). `stats[name]` is an InputStats, or for a
    fused expert stack an ExpertStack (see `matrices`).

    Returns the routing report when targeted MoE experts were calibrated, else None:
    {"min_expert_tokens": n, "routing_weighted": bool, "blocks": {block name: {"tokens": [per expert], "fallback": [experts]}}}."""
    config = config or CalibrationConfig()
    adapter = ModelAdapter(model)
    model_device = _model_device(model)
    device = torch.device(config.device) if config.device else model_device
    need_forward = bool(stats)
    if need_forward and not batches:
        raise ValueError("this method needs calibration batches")

    store = offload_store(model)
    if store is not None:
        store.walking = True
    try:
        return _walk(model, adapter, layer_fn, targets, ignore, batches, stats, config, progress, desc, device, model_device, store)
    finally:
        if store is not None:
            store.walking = False


def _walk(model, adapter, layer_fn, targets, ignore, batches, stats, config, progress, desc, device, model_device, store) -> dict | None:
    need_forward = bool(stats)
    inputs = None
    routing: dict[str, dict] = {}
    try:
        moe_blocks = {b.layer_index: b for b in find_moe_blocks(model, adapter)} if need_forward else {}
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    if need_forward:
        # Everything but the decoder layers moves to the compute device; the layers wait where they are.
        _move_non_layers(model, adapter, device)
        inputs = capture_layer_inputs(model, adapter, batches, device)

    # A disk-offloaded model (core.offload) keeps its layers in files: each is read when its turn comes and
    # written back (changed) afterwards, instead of being moved between devices.
    for i, layer in enumerate(tqdm(adapter.layers, desc=desc, disable=not progress, leave=False)):
        projections = adapter.select(targets, ignore, layer_index=i)
        if store is not None:
            store.materialize(i, device)
        layer_home = next(layer.parameters()).device
        layer.to(device)
        layer_stats: Mapping = {}
        dense_outputs = None
        if need_forward:
            handles = []
            hessian = "hessian" in stats
            collector = _StatsCollector(device, hessian=hessian)
            block = moe_blocks.get(i)
            # Expert weights take per-expert statistics from the recorded routing, not from hooks.
            expert_roles = _expert_roles(block, projections) if block is not None else {}
            recorder = RoutingRecorder([block], keep_calls=True) if expert_roles else contextlib.nullcontext()
            for name, proj in projections.items():
                if name in expert_roles:
                    continue
                if not proj.is_hookable():
                    raise UserInputError(
                        f"'{name}' is a fused expert weight outside any MoE block sparseforge recognises, so a calibrated "
                        "method cannot score it; add '*experts*' to the stage's ignore list or use magnitude for it"
                    )
                handles.append(proj.module.register_forward_hook(collector.hook(name, proj.in_features)))
            try:
                with recorder:
                    # With pruned propagation the dense outputs are not needed: not keeping them saves one copy
                    # of the calibration activations on the device.
                    dense_outputs = _run_layer(layer, inputs, keep=config.propagate == "dense", after_each=collector.end_batch)
            finally:
                for h in handles:
                    h.remove()
            plain = {n: collector.stats.get(n) or InputStats(p.in_features, device, hessian=hessian)
                     for n, p in projections.items() if n not in expert_roles}
            lazy, experts = {}, None
            if expert_roles:
                experts = ExpertInputs(block, recorder, config.min_expert_tokens, device, hessian, config.routing_weighted)
                routing[block.name] = experts.report()
                for name, (e, role) in expert_roles.items():
                    lazy[name] = (lambda x=experts, role=role: ExpertStack(x, role)) if e is None else (lambda x=experts, e=e, role=role: x.stats(e, role))
            layer_stats = LayerStats(plain, lazy)
        layer_fn(i, layer, projections, layer_stats)
        layer_stats = recorder = experts = None  # frees the recorded routing before the next layer
        if need_forward and i + 1 < adapter.num_layers:
            outputs = dense_outputs if config.propagate == "dense" else _run_layer(layer, inputs)
            inputs = [_with_hidden(a, k, h) for (a, k), h in zip(inputs, outputs)]
        if store is not None:
            store.release(i)
        else:
            layer.to(layer_home)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if need_forward:
        _move_non_layers(model, adapter, model_device)
    if not routing:
        return None
    return {"min_expert_tokens": config.min_expert_tokens, "routing_weighted": config.routing_weighted, "blocks": routing}


def _move_non_layers(model: nn.Module, adapter: ModelAdapter, device) -> None:
    layer_params = {id(p) for p in adapter.layers.parameters()} | {id(b) for b in adapter.layers.buffers()}
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and id(p) not in layer_params and p.device != torch.device(device):
                p.data = p.data.to(device)
        for key, b in list(module._buffers.items()):
            if b is not None and id(b) not in layer_params and b.device != torch.device(device):
                module._buffers[key] = b.to(device)
