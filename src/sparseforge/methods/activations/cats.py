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

import torch
from torch import nn

from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.surgery import replace_module
from sparseforge.errors import UserInputError
from sparseforge.methods.activations.base import ActivationMethod, check_fraction, validate_common
from sparseforge.methods.activations.common_params import RuntimeParams
from sparseforge.methods.base import RuntimeState, param, register


@dataclasses.dataclass
class CatsParams(RuntimeParams):
    sparsity: float = param(0.5, "fraction of each MLP's activation outputs zeroed (on average), skipped by the down projection")


class ThresholdedActivation(nn.Module):
    """act(x), with every output of magnitude <= threshold set to zero."""

    def __init__(self, act: nn.Module, threshold: float):
        super().__init__()
        self.original = [act]  # not a submodule: detach puts this very module back
        self.threshold = float(threshold)

    def forward(self, x):
        a = self.original[0](x)
        return a * (a.abs() > self.threshold)


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
        return self.state_from_plan(model, plan, downs, extra=({}, {"activations": thresholds}))

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
        except Exception:
            _restore_activations(model, done)
            raise

    def detach_extra(self, model) -> None:
        _restore_activations(model, [n for n, m in model.named_modules() if isinstance(m, ThresholdedActivation)])


def _restore_activations(model, names) -> None:
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, ThresholdedActivation):
            replace_module(model, name, mod.original[0])
