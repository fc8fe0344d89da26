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
from sparseforge.methods.base import RuntimeMethod, RuntimeState, param, register


@dataclasses.dataclass
class QuantKernelParams:
    token_counts: list[int] = param([1, 16, 128, 512], "token counts per product at which the gate times the kernel against dense")
    repeats: int = param(10, "timed calls per (shape, token count) and round; the gate keeps the median")
    warmup: int = param(3, "untimed calls before timing")
    margin: float = param(0.05, "the kernel is chosen only where it was faster than dense by more than this fraction")


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
class QuantKernel(RuntimeMethod):
    name = "quant-kernel"
    family = "kernels"
    summary = "multiply quantized projections through int8/int4 weight-only CPU kernels where a speed gate measured at compress time finds them faster"
    Params = QuantKernelParams

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        counts = params.token_counts
        if not counts or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in counts):
            raise UserInputError(f"{where}token_counts must be a non-empty list of positive integers, e.g. [1, 16, 128, 512]")
        if params.repeats < 1 or params.warmup < 0:
            raise UserInputError(f"{where}repeats must be >= 1 and warmup >= 0 (e.g. 10 and 3)")
        if not 0 <= params.margin < 1:
            raise UserInputError(f"{where}margin {params.margin} must be in [0, 1), e.g. 0.05")

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
