"""CATS (Lee et al., 2024, "Contextually-Aware Thresholding for Sparsity"): zero the MLP's activation output
act(gate(x)) wherever its magnitude is below a per-layer threshold, calibrated as the `sparsity` quantile of
|act(gate(x))| on calibration tokens. The zeros pass through act * up into the down projection's input, whose
rows the row-skipping kernel then skips (the down product reads only the active channels).

The MLP's activation is found generically: the one parameter-free, non-linear submodule of the adapter's MLP
module (`act_fn`, `activation_fn`, `act`...); it is replaced by a thresholding wrapper while attached. CATS's own
kernel also skips the matching rows of the up projection (its output channels); we compute up densely, so on
a gated MLP the up product is not accelerated (see docs/methods/cats.md).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.surgery import replace_module
from sparseforge.errors import UserInputError
from sparseforge.kernels import activation_sparse as ak
from sparseforge.methods.activations.base import ActivationMethod, ActivationSparseLinear, check_fraction, validate_common
from sparseforge.methods.activations.common_params import RuntimeParams
from sparseforge.methods.base import RuntimeState, param, register

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CatsParams(RuntimeParams):
    sparsity: float = param(0.5, "fraction of each MLP's activation outputs zeroed (on average), skipped by the down projection")
    sparse_up: bool = param(True, "on gated MLPs also compute only the active rows of the up projection (fused with the down product, "
                                  "CPU), where the speed gate measured that faster")


class ThresholdedActivation(nn.Module):
    """act(x), with every output of magnitude <= threshold set to zero."""

    def __init__(self, act: nn.Module, threshold: float):
        super().__init__()
        self.original = [act]  # not a submodule: detach puts this very module back
        self.threshold = float(threshold)

    def forward(self, x):
        a = self.original[0](x)
        return a * (a.abs() > self.threshold)


class FusedGatedMLP(nn.Module):
    """Stands in for a gated MLP module while CATS is attached. Where the down projection's gate chose the fused
    path for this many tokens, y = down(thresholded act(gate(x)) * up(x)) is computed by one kernel call that reads
    only the active rows of W_up and of W_down's input-major copy; otherwise the original module runs (with its
    thresholded activation and row-skipping down projection in place). `names` are the gate, up, down and
    activation submodules relative to the MLP."""

    def __init__(self, mlp: nn.Module, names: dict[str, str], threshold: float, prefill: str):
        super().__init__()
        self.original = [mlp]  # not a submodule: detach puts this very module back
        # The MLP's own children, under their own names: state-dict keys, module paths and whatever walks
        # named_modules (measure_sparsity, detach) see the same layers as without the wrapper.
        for child_name, child in mlp.named_children():
            self.add_module(child_name, child)
        self.names = dict(names)
        self.threshold = float(threshold)
        self.prefill = prefill

    def part(self, role: str) -> nn.Module:
        return self.get_submodule(self.names[role])

    def forward(self, x, *args, **kwargs):
        mlp = self.original[0]
        down = self.part("down")
        tokens = x.numel() // x.shape[-1]
        positions = x.shape[-2] if x.dim() >= 3 else 1
        if (args or kwargs or (positions > 1 and self.prefill != "sparse") or not isinstance(down, ActivationSparseLinear)
                or (torch.is_grad_enabled() and down.weight.requires_grad) or down.decision(tokens, "mlp") != "sparse"):
            return mlp(x, *args, **kwargs)
        act = self.part("act")
        act = act.original[0] if isinstance(act, ThresholdedActivation) else act
        x2 = x.reshape(tokens, x.shape[-1])
        a = act(self.part("gate")(x2))
        if down.counter is not None:
            down.counter[0] += float((a.abs() <= self.threshold).sum())
            down.counter[1] += a.numel()
        y = ak.gated_mlp_product(a, x2, self.part("up").weight, down.weight_t(), self.threshold)[0]
        if down.bias is not None:
            y = y + down.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def gated_layouts(model, downs) -> dict[str, tuple[str, dict[str, str]]]:
    """{down projection: (MLP module name, {"gate", "up", "down": names relative to the MLP})} for the selected down
    projections whose MLP has exactly one gate and one up projection, inside the MLP module, the up without bias."""
    adapter = ModelAdapter(model)
    found = {}
    for i in range(adapter.num_layers):
        layout = adapter.mlp_layout(i)
        if layout.module is None or layout.output is None or layout.experts:
            continue
        down = layout.qualified(layout.output)
        gates = [n for n in layout.inputs if layout.roles.get(n) == "gate"]
        ups = [n for n in layout.inputs if layout.roles.get(n) == "up"]
        if down not in downs or len(gates) != 1 or len(ups) != 1 or len(layout.inputs) != 2:
            continue
        prefix = layout.module + "."
        if not all(n.startswith(prefix) for n in (gates[0], ups[0], layout.output)):
            continue
        mlp = model.get_submodule(layout.qualified(layout.module))
        if list(mlp.parameters(recurse=False)) or list(mlp.buffers(recurse=False)):
            continue  # the wrapper re-exposes children only
        if model.get_submodule(layout.qualified(ups[0])).bias is not None:
            continue
        found[down] = (layout.qualified(layout.module), {"gate": gates[0][len(prefix):], "up": ups[0][len(prefix):],
                                                         "down": layout.output[len(prefix):]})
    return found


def _computes_gated_product(mlp: nn.Module, names: dict[str, str]) -> bool:
    """Whether `mlp(x)` is down(act(gate(x)) * up(x)) on a random probe (the structure the fused kernel assumes)."""
    parts = {r: mlp.get_submodule(n) for r, n in names.items()}
    w = parts["up"].weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, parts["up"].in_features, generator=g).to(w.device, w.dtype)
    with torch.no_grad():
        try:
            ref = mlp(x)
        except Exception:  # noqa: BLE001  (an MLP that needs more than x is not one we fuse)
            return False
        ours = parts["down"](parts["act"](parts["gate"](x)) * parts["up"](x))
    return ref.shape == ours.shape and torch.allclose(ref.float(), ours.float(), rtol=1e-3, atol=1e-3 * float(ref.float().abs().max()) + 1e-6)


def find_activations(model, targets, ignore) -> dict[str, tuple[str, nn.Module]]:
    """{MLP output projection name: (activation module name, module)} for every layer whose down projection is
    selected and whose MLP has exactly one parameter-free non-linear child."""
    adapter = ModelAdapter(model)
    selected = adapter.select(targets, ignore)
    found = {}
    for i in range(adapter.num_layers):
        layout = adapter.mlp_layout(i)
        if layout.module is None or layout.output is None or layout.experts:
            continue
        down = layout.qualified(layout.output)
        if down not in selected or not isinstance(selected[down].module, nn.Linear):
            continue
        mlp_name = layout.qualified(layout.module)
        mlp = model.get_submodule(mlp_name)
        acts = [(n, m) for n, m in mlp.named_children()
                if not isinstance(m, (nn.Linear, nn.Dropout, nn.Identity)) and not list(m.parameters()) and not list(m.children())]
        if len(acts) == 1:
            found[down] = (f"{mlp_name}.{acts[0][0]}", acts[0][1])
    if not found:
        raise UserInputError("cats found no MLP with a down projection and one activation module among the stage's targets; "
                             "it needs gated or plain MLPs (Llama-style act_fn); widen 'targets' or use teal")
    return found


@register
class Cats(ActivationMethod):
    name = "cats"
    summary = "threshold the MLP activation (SwiGLU gate) so the down projection skips zeroed channels"
    Params = CatsParams

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        check_fraction(params.sparsity, f"{where}: " if where else "", "sparsity", 0.95)
        validate_common(params, where)

    @classmethod
    def example_params(cls) -> dict:
        return {"sparsity": 0.5, "gate_token_counts": [1], "gate_repeats": 1}

    def calibrate(self, model, context) -> RuntimeState:
        from sparseforge.methods.activations.base import _refuse_second_stage

        _refuse_second_stage(model)
        acts = find_activations(model, context.targets, context.ignore)
        batches = self.calibration_batches(context)
        act_modules = {name: m for name, m in acts.values()}
        sites = {s.name: s for s in self.collect_sites(model, act_modules, batches, observe_output=True)}
        downs = {down: model.get_submodule(down) for down in acts}
        s = self.params.sparsity
        thresholds = {name: sites[name].threshold(s) for name in act_modules if name in sites}
        plan = {down: {"threshold": torch.zeros(downs[down].in_features), "sparsity": s, "site": act} for down, (act, _) in acts.items()
                if act in thresholds}
        state = self.state_from_plan(model, plan, downs, extra=({}, {"activations": thresholds}))
        fusable = gated_layouts(model, plan) if self.params.sparse_up else {}
        w = next(iter(downs.values())).weight
        if fusable and ak.cpu_extras_supported(ak.get_activation_kernel(self.params.kernel), w.device, w.dtype):
            shapes = {(downs[d].in_features, downs[d].out_features) for d in fusable}
            mlp_gate = ak.ActivationGate.measure_gated_mlp(shapes, w.dtype, self.params.gate_token_counts, [round(ak.density_bucket(1 - s), 2)],
                                                           repeats=self.params.gate_repeats, warmup=1)
            state.data["gate"] = ak.ActivationGate.from_dict(state.data["gate"]).merge(mlp_gate).to_dict()
        return state

    def attach_extra(self, model, state) -> None:
        acts = state.data.get("activations")
        if not isinstance(acts, dict) or not acts:
            raise UserInputError("cats state needs 'activations' (thresholds per MLP activation); re-create the artifact")
        done = []
        try:
            for name, t in acts.items():
                try:
                    old = model.get_submodule(name)
                except AttributeError:
                    raise UserInputError(f"cats state names activation '{name}', which this model does not have; attach it to the model "
                                         "it was calibrated on") from None
                replace_module(model, name, ThresholdedActivation(old, float(t)))
                done.append(name)
            if self.params.sparse_up:
                self.fuse_mlps(model, acts)
        except Exception:
            _restore_mlps(model)
            _restore_activations(model, done)
            raise

    def fuse_mlps(self, model, acts: dict[str, float]) -> None:
        """Put a `FusedGatedMLP` over every gated MLP whose down projection is routed and whose module computes
        down(act(gate(x)) * up(x)) (checked on a probe, with the activation not yet thresholded)."""
        downs = {n: m for n, m in model.named_modules() if isinstance(m, ActivationSparseLinear)}
        for down, (mlp_name, names) in gated_layouts(model, downs).items():
            mlp = model.get_submodule(mlp_name)
            act_name = next((a for a in acts if a.startswith(mlp_name + ".") and "." not in a[len(mlp_name) + 1:]), None)
            if act_name is None:
                continue
            names = {**names, "act": act_name[len(mlp_name) + 1:]}
            act = mlp.get_submodule(names["act"])
            probe_names = dict(names)
            if isinstance(act, ThresholdedActivation):  # probe with the plain activation: put it back for the check
                replace_module(model, act_name, act.original[0])
            try:
                ok = _computes_gated_product(mlp, probe_names)
            finally:
                if isinstance(act, ThresholdedActivation):
                    replace_module(model, act_name, act)
            if not ok:
                log.info("cats: %s does not compute down(act(gate(x)) * up(x)); its up product stays dense", mlp_name)
                continue
            downs[down].mlp_fused = True
            replace_module(model, mlp_name, FusedGatedMLP(mlp, names, float(acts[act_name]), self.params.prefill))

    def detach_extra(self, model) -> None:
        _restore_mlps(model)
        _restore_activations(model, [n for n, m in model.named_modules() if isinstance(m, ThresholdedActivation)])


def _restore_mlps(model) -> None:
    for name in [n for n, m in model.named_modules() if isinstance(m, FusedGatedMLP)]:
        mod = model.get_submodule(name)
        for m in mod.original[0].modules():
            if isinstance(m, ActivationSparseLinear):
                m.mlp_fused = False
        replace_module(model, name, mod.original[0])


def _restore_activations(model, names) -> None:
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, ThresholdedActivation):
            replace_module(model, name, mod.original[0])
