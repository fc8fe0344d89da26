"""What every activation-sparsity method shares: calibration on the model's own inputs, thresholds saved as the
runtime state, module replacement on attach (and its exact undo on detach), and the row-skipping product.

A method only decides which input channels of each projection are zeroed for the current tokens. It does so
by a threshold per input channel of each projection (a vector; TEAL's is one value repeated, WINA's is one value
divided by each weight column's norm), so every method runs through the same fused kernel:
channel j of token t is kept when |x[t, j]| > threshold[j]. Subclasses implement `thresholds()` from the
calibration samples; CATS adds a threshold on the MLP activation and R-Sparse a low-rank remainder.

Projections are found by the adapter (every `nn.Linear` inside the decoder layers that the stage's targets
select), so no per-model code; fused expert stacks and GPT-2's Conv1D are left dense. Projections that read the
same tensor (q/k/v, gate/up) form one *input site*, found by tensor identity during calibration as
`core.calibration` does: TEAL calibrates one threshold per site.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.surgery import replace_module
from sparseforge.errors import UserInputError
from sparseforge.kernels import activation_sparse as kernel
from sparseforge.kernels.base import GatedLinear
from sparseforge.methods.base import RuntimeMethod, RuntimeState

PREFILL_MODES = ("sparse", "dense", "partial")
KERNEL_CHOICES = kernel.activation_kernel_names  # a registry: choices resolved when a recipe is checked
MAX_SAMPLE_TOKENS = 4096  # calibration tokens kept per input site (a random subset), bounding memory on big models


def check_fraction(value: float, where: str, name: str, upper: float = 0.99) -> None:
    if not 0.0 <= value <= upper:
        raise UserInputError(f"{where}{name} {value} must be in [0, {upper}], e.g. 0.5")


def validate_common(params, where: str) -> None:
    """Checks of the parameters every activation method has (prefill treatment, kernel, gate)."""
    w = f"{where}: " if where else ""
    if getattr(params, "prefill_dense_tokens", 0) < 0:
        raise UserInputError(f"{w}prefill_dense_tokens must be >= 0, e.g. 64")
    counts = getattr(params, "gate_token_counts", [1])
    if not counts or not all(isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 64 for t in counts):
        raise UserInputError(f"{w}gate_token_counts must be a non-empty list of integers in [1, 64], e.g. [1, 2, 4, 8]")
    if getattr(params, "gate_repeats", 1) < 1:
        raise UserInputError(f"{w}gate_repeats must be >= 1, e.g. 7")


class ActivationSparseLinear(GatedLinear):
    """Stands in for an `nn.Linear` while an activation stage is attached: zero the input channels at or below the
    thresholds, then multiply, through the row-skipping kernel where the gate measured it faster, else through the
    reference (mask, then `F.linear`). It holds the replaced layer (`original`) and shares its parameters, so
    detach puts back the very same module and the weights in a state dict keep their names. The per-token-count
    decision cache is `GatedLinear`'s; this layer's gate also keys on its density (fixed per layer).

    prefill: "sparse" thresholds every token; "dense" runs forwards of more than one position (a prompt) densely
    and only decode steps sparse; "partial" keeps the first `dense_tokens` positions of a multi-position forward
    dense (they hold the attention sinks, whose activations are the largest) and thresholds the rest.
    `lowrank` (R-Sparse): (U [out, r], V [r, in]) with U V ≈ W, applied to the channels the mask dropped.
    `int8` (a `QuantizedWeight` of 8-bit per-channel codes that the weight exactly is): the sparse path skips rows
    of the int8 codes instead (`kernels.activation_sparse.Int8Rows`), and the gate may pick issue 11's int8 dense
    kernel on the masked input ("int8") where that beats both."""

    def __init__(self, original: nn.Linear, threshold: torch.Tensor, density: float, gate: kernel.ActivationGate | None,
                 prefill: str = "sparse", dense_tokens: int = 0, lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
                 product: str = "row-skip", int8=None):
        self._share(original)
        self.kernel = kernel.get_activation_kernel(product)
        self.original = [original]  # a list: not a submodule, so its parameters are not listed twice
        self.register_buffer("threshold", threshold.to(original.weight.device, torch.float32), persistent=False)
        if lowrank is not None:
            self.register_buffer("lowrank_u", lowrank[0].to(original.weight.device, original.weight.dtype), persistent=False)
            self.register_buffer("lowrank_v", lowrank[1].to(original.weight.device, original.weight.dtype), persistent=False)
        self.has_lowrank = lowrank is not None
        self.int8_rows = self.int8_dense = None
        if int8 is not None:
            from sparseforge.kernels.int_weight_only import Int8WeightOnly

            self.int8_rows = kernel.Int8Rows.from_quantized(int8)
            if kernel.int8_dense_ok(original.in_features):
                self.int8_dense = (Int8WeightOnly(), Int8WeightOnly().pack(int8))
        self.density = float(density)
        self.gate = gate
        self.mlp_fused = False  # CATS sets it where it fuses this down projection with its MLP's up product
        self.prefill, self.dense_tokens = prefill, int(dense_tokens)
        self.counter: list[float] | None = None  # [zeroed entries, entries] while measuring
        self._wt, self._wt_for = None, None

    def _apply(self, fn, *args, **kwargs):
        self._wt, self._wt_for = None, None  # device or dtype may change (GatedLinear forgets its decisions)
        if self.int8_rows is not None:
            self.int8_rows = self.int8_dense = None  # the codes describe the weight as it was; a cast changes it
        return super()._apply(fn, *args, **kwargs)

    def weight_t(self) -> torch.Tensor:
        """The input-major copy [in, out] the kernel reads, rebuilt whenever the weight changes. Extra memory next to
        the dense weight (see docs/methods/activations.md, "what is worse")."""
        w = self.weight
        version = (w.device, w.dtype, w.data_ptr(), w._version)
        if self._wt_for != version:
            self._wt = w.detach().t().contiguous()
            self._wt_for = version
        return self._wt

    def decide(self, tokens: int, *key) -> str:
        """"sparse", "int8" or "dense" for `tokens` tokens; key ("mlp",): whether CATS's fused MLP runs ("sparse")."""
        w = self.weight
        if self.gate is None:
            return "dense"
        if key == ("mlp",):
            if not (self.mlp_fused and kernel.cpu_extras_supported(self.kernel, w.device, w.dtype)):
                return "dense"
            return self.gate.choose(kernel.mlp_gate_key(self.in_features, self.out_features, w.dtype), tokens, self.density)
        if self.int8_rows is not None:
            if not kernel.cpu_extras_supported(self.kernel, w.device, w.dtype):
                return "dense"
            choice = self.gate.choose(kernel.int8_gate_key(self.out_features, self.in_features, w.dtype), tokens, self.density)
            return "dense" if choice == "int8" and self.int8_dense is None else choice
        if not self.kernel.supports(w.device, w.dtype):
            return "dense"
        choice = self.gate.choose(kernel.gate_key(self.out_features, self.in_features, w.dtype, w.device), tokens, self.density)
        return "sparse" if choice == "sparse" else "dense"

    def uses_kernel(self, tokens: int) -> bool:
        return self.decision(tokens) == "sparse"

    def sparse_product(self, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, in] -> [tokens, out], thresholded; no bias."""
        if self.counter is not None:
            self.counter[0] += float((x.abs() <= self.threshold.to(x.dtype)).sum())
            self.counter[1] += x.numel()
        path = "dense" if torch.is_grad_enabled() and self.weight.requires_grad else self.decision(x.shape[0])
        if path == "sparse" and self.int8_rows is not None:
            y = kernel.row_skip_int8_product(x, self.int8_rows, self.threshold)[0]
        elif path == "sparse":
            y = self.kernel.product(x, self.weight_t(), self.threshold)
        elif path == "int8":
            mask = x.abs() > self.threshold.to(x.dtype)
            y = self.int8_dense[0].matmul(x * mask, self.int8_dense[1])
        else:
            y = kernel.reference_product(x, self.weight, self.threshold)
        if self.has_lowrank:
            dropped = x * (x.abs() <= self.threshold.to(x.dtype))
            y = y + F.linear(F.linear(dropped, self.lowrank_v), self.lowrank_u)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = x.shape[-2] if x.dim() >= 3 else 1
        if positions > 1 and self.prefill == "dense":
            return F.linear(x, self.weight, self.bias)
        if positions > 1 and self.prefill == "partial" and self.dense_tokens > 0:
            head = min(self.dense_tokens, positions)
            dense = F.linear(x[..., :head, :], self.weight, self.bias)
            if head == positions:
                return dense
            return torch.cat([dense, self.forward_sparse(x[..., head:, :])], dim=-2)
        return self.forward_sparse(x)

    def forward_sparse(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sparse_product(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, density={self.density:.3f}, "
                f"prefill={self.prefill}, lowrank={self.has_lowrank}, int8={self.int8_rows is not None}, kernel={self.kernel.name}")


@dataclasses.dataclass
class Site:
    """One input tensor of a layer and the projections that read it, with calibration samples of it."""

    name: str  # the first projection that reads it
    layer: int
    projections: list[str]
    samples: torch.Tensor  # [tokens, in] float32, a random subset of calibration tokens

    def params(self, sizes: dict[str, int]) -> int:
        return sum(sizes[p] for p in self.projections)

    def sorted_abs(self) -> torch.Tensor:
        """|samples| flattened and sorted, computed once (every threshold of this site is a quantile of it)."""
        if getattr(self, "_sorted", None) is None:
            self._sorted = self.samples.abs().flatten().sort().values
        return self._sorted

    def threshold(self, sparsity: float) -> float:
        return quantile_threshold(self.sorted_abs(), sparsity, is_sorted=True)


class ActivationMethod(RuntimeMethod):
    """Base of the activation-sparsity methods. Subclasses implement `thresholds` (and may extend `calibrate`,
    `attach_extra`, `detach_extra`). Params shared by all: prefill, prefill_dense_tokens, kernel,
    gate_token_counts, gate_repeats."""

    family = "activations"

    # ---- calibration -------------------------------------------------------------------------------------
    def selected(self, model, targets, ignore) -> dict[str, nn.Linear]:
        adapter = ModelAdapter(model)
        found = {n: p.module for n, p in adapter.select(targets, ignore).items() if p.kind == "linear" and isinstance(p.module, nn.Linear)}
        if not found:
            raise UserInputError(f"{self.name}: the stage's targets {list(targets)} select no nn.Linear projection inside the decoder layers; "
                                 "widen 'targets' (e.g. ['*'])")
        return found

    def calibration_batches(self, context) -> list[torch.Tensor]:
        from sparseforge.core.calibration import CalibrationConfig, calibration_batches

        if context.tokenizer is None:
            raise UserInputError(f"{self.name} calibrates thresholds on text and needs the model's tokenizer; pass one to compress")
        return calibration_batches(context.tokenizer, context.calibration or CalibrationConfig())

    def collect_sites(self, model, modules: dict[str, nn.Module], batches, observe_output: bool = False,
                      max_tokens: int = MAX_SAMPLE_TOKENS, seed: int = 0) -> list[Site]:
        """Run the calibration batches through the model and keep a random subset of the input (or, with
        `observe_output`, the output) of each module, grouping modules that read the identical tensor."""
        adapter = ModelAdapter(model)
        layer_of = {n: next(i for i in range(adapter.num_layers) if n.startswith(adapter.layer_name(i) + ".")) for n in modules}
        chunks: dict[str, list[torch.Tensor]] = {}
        alias: dict[str, str] = {}
        seen: dict[int, tuple[torch.Tensor, str]] = {}
        first = [True]

        def hook(name):
            def grab(module, args, output):
                x = output if observe_output else args[0]
                if first[0]:
                    hit = seen.get(id(x))
                    if hit is not None and hit[0] is x:
                        alias[name] = hit[1]
                        return
                    seen[id(x)] = (x, name)
                if name in alias:
                    return
                chunks.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]).float().cpu())
            return grab

        handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
        device = next(model.parameters()).device
        try:
            with torch.inference_mode():
                for ids in batches:
                    model(input_ids=ids.to(device), use_cache=False)
                    first[0] = False
                    seen.clear()
        finally:
            for h in handles:
                h.remove()
        g = torch.Generator().manual_seed(seed)
        sites = []
        for name in modules:
            if name in alias or name not in chunks:
                continue
            x = torch.cat(chunks.pop(name))
            if x.shape[0] > max_tokens:
                x = x[torch.randperm(x.shape[0], generator=g)[:max_tokens]]
            readers = [name] + [a for a, b in alias.items() if b == name]
            sites.append(Site(name, layer_of[name], [r for r in modules if r in readers], x))
        return sites

    def measure_gate(self, model, modules: dict[str, nn.Module], densities: dict[str, float]) -> kernel.ActivationGate:
        """Time dense vs. row skipping on the routed projections' shapes, dtype and expected densities (only the
        buckets in use), unless the stage asked for the reference path or the kernel cannot run here. Projections
        stored as int8 codes (see `int8_records`) are timed over their codes, against the int8 dense kernel too."""
        p = self.params
        w = next(iter(modules.values())).weight
        product = kernel.get_activation_kernel(p.kernel)
        gate = kernel.ActivationGate()
        if not product.supports(w.device, w.dtype):
            return gate
        int8 = self.int8_records(model, modules)
        wanted: dict[tuple[int, int, bool], set[float]] = {}
        for name, m in modules.items():
            shape = (m.out_features, m.in_features, name in int8)
            wanted.setdefault(shape, set()).add(round(kernel.density_bucket(densities[name]), 2))
        for (out_f, in_f, is_int8), buckets in wanted.items():
            if is_int8:
                part = kernel.ActivationGate.measure_int8([(out_f, in_f)], w.dtype, p.gate_token_counts, sorted(buckets), repeats=p.gate_repeats,
                                                          warmup=1)
            else:
                part = kernel.ActivationGate.measure([(out_f, in_f)], w.dtype, p.gate_token_counts, sorted(buckets), repeats=p.gate_repeats,
                                                     warmup=1, kernel=product, device=w.device)
            gate.merge(part)
        return gate

    def int8_records(self, model, modules: dict[str, nn.Module]) -> dict:
        """{projection: QuantizedWeight} for the projections whose weight is exactly recorded 8-bit per-channel codes
        (a gptq/rtn stage with bits 8 and group_size 0 ran before, or a compact artifact was loaded), when the stage's
        `int8` is "auto" and the C++ kernel can run; their products then skip rows of the codes."""
        from sparseforge.core.quantizer import quantized_weights

        if getattr(self.params, "int8", "off") != "auto":
            return {}
        records = quantized_weights(model)
        found = {}
        for name, m in modules.items():
            qw = records.get(f"{name}.weight")
            w = m.weight
            if (qw is None or not kernel.Int8Rows.accepts(qw) or tuple(w.shape) != qw.shape
                    or not kernel.cpu_extras_supported(kernel.get_activation_kernel(self.params.kernel), w.device, w.dtype)):
                continue
            if torch.equal(qw.dequantize().to(w.dtype), w.detach()):  # the weight still is its codes
                found[name] = qw
        return found

    def thresholds(self, model, sites: list[Site], modules: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
        """{projection: {"threshold": tensor [in] float32, "sparsity": expected fraction zeroed, "site": name,
        optional "lowrank": (U, V)}} for every projection to route."""
        raise NotImplementedError

    def calibrate(self, model, context) -> RuntimeState:
        _refuse_second_stage(model)
        modules = self.selected(model, context.targets, context.ignore)
        batches = self.calibration_batches(context)
        sites = self.collect_sites(model, modules, batches)
        plan = self.thresholds(model, sites, modules)
        return self.state_from_plan(model, plan, modules, extra=self.extra_state(model, sites, plan))

    def extra_state(self, model, sites, plan) -> tuple[dict, dict]:
        """(tensors, data) a subclass adds to the state (CATS: activation thresholds)."""
        return {}, {}

    def state_from_plan(self, model, plan, modules, extra=({}, {})) -> RuntimeState:
        densities = {n: 1.0 - float(v["sparsity"]) for n, v in plan.items()}
        gate = self.measure_gate(model, {n: modules[n] for n in plan}, densities)
        tensors = {f"{n}.threshold": v["threshold"].float().cpu().contiguous() for n, v in plan.items()}
        for n, v in plan.items():
            if v.get("lowrank") is not None:
                tensors[f"{n}.lowrank_u"], tensors[f"{n}.lowrank_v"] = (t.cpu().contiguous() for t in v["lowrank"])
        params = {n: modules[n].weight.numel() for n in plan}
        total = sum(params.values())
        data = {
            "projections": {n: {"site": v["site"], "sparsity": round(float(v["sparsity"]), 6)} for n, v in plan.items()},
            "target_sparsity": round(sum(params[n] * float(plan[n]["sparsity"]) for n in plan) / max(total, 1), 6),
            "gate": gate.to_dict(),
        }
        tensors.update(extra[0])
        data.update(extra[1])
        return RuntimeState(tensors=tensors, data=data)

    # ---- attach / detach ---------------------------------------------------------------------------------
    def attach(self, model, state: RuntimeState) -> None:
        _refuse_second_stage(model)
        data, tensors = state.data, state.tensors
        projections = data.get("projections")
        if not isinstance(projections, dict) or not projections or "gate" not in data:
            raise UserInputError(f"{self.name} state needs 'projections' and 'gate'; re-create the artifact")
        gate = kernel.ActivationGate.from_dict(data["gate"])
        swapped: list[str] = []
        try:
            linears = {}
            for name in projections:
                try:
                    linears[name] = model.get_submodule(name)
                except AttributeError:
                    raise UserInputError(f"{self.name} state names projection '{name}', which this model does not have; "
                                         "attach it to the model it was calibrated on") from None
            int8 = self.int8_records(model, {n: m for n, m in linears.items() if isinstance(m, nn.Linear)})
            for name, info in projections.items():
                old = linears[name]
                t = tensors.get(f"{name}.threshold")
                if not isinstance(old, nn.Linear) or t is None or tuple(t.shape) != (old.in_features,):
                    raise UserInputError(f"{self.name} state for '{name}' does not fit the model (needs an nn.Linear and a threshold of its "
                                         "input size); attach it to the model it was calibrated on")
                lowrank = None
                if f"{name}.lowrank_u" in tensors:
                    lowrank = (tensors[f"{name}.lowrank_u"], tensors[f"{name}.lowrank_v"])
                new = ActivationSparseLinear(old, t, 1.0 - float(info["sparsity"]), gate, self.params.prefill,
                                             self.params.prefill_dense_tokens, lowrank, self.params.kernel, int8.get(name))
                replace_module(model, name, new)
                swapped.append(name)
            self.attach_extra(model, state)
        except Exception:
            _restore(model, swapped)
            raise
        self.swapped = swapped

    def attach_extra(self, model, state: RuntimeState) -> None:
        """Further module changes a subclass makes (CATS: the MLP activation)."""

    def detach_extra(self, model) -> None:
        pass

    def detach(self, model) -> None:
        self.detach_extra(model)
        _restore(model, [n for n, m in model.named_modules() if isinstance(m, ActivationSparseLinear)])

    def report(self, state: RuntimeState) -> dict:
        gate = kernel.ActivationGate.from_dict(state.data["gate"])
        kernel_cases = sum(gate.choose(k, t, d) == "sparse" for k, pt in gate.timings.items() for t, per in pt.items() for d in per)
        return {"target_sparsity": state.data.get("target_sparsity"), "projections": len(state.data["projections"]),
                "prefill": self.params.prefill, "kernel": self.params.kernel, "cpu_kernel_built": kernel.available(),
                "kernel_cases": kernel_cases, "measured_cases": sum(len(per) for pt in gate.timings.values() for per in pt.values())}


def _restore(model, names) -> None:
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, ActivationSparseLinear):
            replace_module(model, name, mod.original[0])


def _refuse_second_stage(model) -> None:
    if any(isinstance(m, ActivationSparseLinear) for m in model.modules()):
        raise UserInputError("the model's projections already carry an activation-sparsity stage (one per model); drop the second one")


def quantile_threshold(values: torch.Tensor, sparsity: float, is_sorted: bool = False) -> float:
    """The value at or below which a fraction `sparsity` of `values` lies (|x| <= t is zeroed), by linear
    interpolation between order statistics. `is_sorted`: `values` is already a sorted 1-D tensor (reuse it:
    sorting is what costs)."""
    v = values if is_sorted else values.flatten().float().sort().values
    if sparsity <= 0 or v.numel() == 0:
        return -1.0  # keep everything, an exact zero too
    pos = min(sparsity, 1.0) * (v.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


@contextlib.contextmanager
def measure_sparsity(model):
    """Count, while the block runs, the input entries each attached projection zeroes. Yields a dict filled on exit:
    {"projections": {name: fraction}, "weighted": fraction weighted by each projection's parameter count (the model-
    wide sparsity TEAL targets), "mean": plain mean}."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, ActivationSparseLinear)}
    for m in mods.values():
        m.counter = [0.0, 0.0]
    result: dict[str, Any] = {}
    try:
        yield result
    finally:
        fractions = {n: (m.counter[0] / m.counter[1] if m.counter[1] else math.nan) for n, m in mods.items()}
        sizes = {n: m.weight.numel() for n, m in mods.items()}
        seen = {n: f for n, f in fractions.items() if not math.isnan(f)}
        result["projections"] = fractions
        result["weighted"] = sum(sizes[n] * f for n, f in seen.items()) / max(sum(sizes[n] for n in seen), 1)
        result["mean"] = sum(seen.values()) / max(len(seen), 1)
        for m in mods.values():
            m.counter = None
