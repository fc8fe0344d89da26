"""The weight-only integer kernels (kernels/int_weight_only.py) as a runtime stage. Calibration times each
quantized projection's shape and scheme, dense against the kernel, in the model's dtype on the machine that
compresses; the gate is the stage's whole state (JSON). Attach swaps each selected nn.Linear whose weight has
recorded codes (a quantizing stage ran before, or a compact artifact was loaded) for a `QuantLinear`; detach
swaps the original modules back, so outputs are bit-identical to before."""
from __future__ import annotations

import dataclasses

from torch import nn

from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.quantizer import quantized_weights
from sparseforge.core.surgery import replace_module
from sparseforge.errors import UserInputError
from sparseforge.kernels.base import SpeedGate
from sparseforge.kernels.int_weight_only import QuantLinear, kernel_for, measure_gate
from sparseforge.methods.base import RuntimeState, register
from sparseforge.methods.kernels.base import GateParams, KernelStage


@dataclasses.dataclass
class QuantKernelParams(GateParams):
    pass


def _routable(model, targets, ignore) -> dict:
    """{projection name: (module, QuantizedWeight, kernel)} for selected plain nn.Linear weights with codes a kernel takes."""
    records = quantized_weights(model)
    chosen = {}
    for name, proj in ModelAdapter(model).select(targets, ignore).items():
        qw = records.get(proj.state_key)
        if qw is None or proj.kind != "linear" or type(proj.module) is not nn.Linear:
            continue
        kernel = kernel_for(qw)
        if kernel is not None:
            chosen[name] = (proj.module, qw, kernel)
    return chosen


@register
class QuantKernel(KernelStage):
    name = "quant-kernel"
    summary = "multiply quantized projections through int8/int4 weight-only CPU kernels where a speed gate measured at compress time finds them faster"
    Params = QuantKernelParams

    @classmethod
    def example_params(cls) -> dict:
        return {"token_counts": [1, 8], "repeats": 1, "warmup": 0}

    def calibrate(self, model, context) -> RuntimeState:
        p = self.params
        chosen = _routable(model, context.targets, context.ignore)
        keys = sorted({kernel.key_for(qw) for _, qw, kernel in chosen.values()})
        dtype = next(iter(chosen.values()))[0].weight.dtype if chosen else None
        gate = measure_gate(keys, p.token_counts, dtype, p.repeats, p.warmup, p.margin) if keys else SpeedGate(margin=p.margin, kernel="weight-only")
        return RuntimeState(data={"gate": gate.to_dict(), "targets": list(context.targets), "ignore": list(context.ignore)})

    def attach(self, model, state: RuntimeState) -> None:
        data = state.data
        targets, ignore = data.get("targets", ["*"]), data.get("ignore", [])
        if not isinstance(targets, list) or not isinstance(ignore, list) or "gate" not in data:
            raise UserInputError("quant-kernel state needs 'gate' (a speed gate) and 'targets'/'ignore' lists; re-create the artifact")
        self.gate = SpeedGate.from_dict(data["gate"])
        self.replaced = {}
        for name, (module, qw, kernel) in _routable(model, targets, ignore).items():
            replace_module(model, name, QuantLinear(module, qw, kernel, self.gate))
            self.replaced[name] = module

    def detach(self, model) -> None:
        for name, module in getattr(self, "replaced", {}).items():
            replace_module(model, name, module)
        self.replaced = {}

    def report(self, state: RuntimeState) -> dict:
        choices = list(self.gate.choices().values())
        return {"projections": list(self.replaced), "kernel_cases": choices.count("sparse"), "measured_cases": len(choices)}
