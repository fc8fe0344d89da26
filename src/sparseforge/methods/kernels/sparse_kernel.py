"""The sparse kernels (kernels/) as a runtime stage. Calibration measures a `SpeedGate` on the compressed
model's own projection shapes and sparsities, on the device and dtype it was compressed with; the gate's
timings are the stage's whole state (JSON), so a loaded artifact routes its projections the same way without
measuring again. `--kernel` on `eval` and `run` is a shorthand for this stage."""
from __future__ import annotations

import dataclasses

from sparseforge.errors import UserInputError
from sparseforge.kernels.base import SparseLinear, SpeedGate, kernel_names
from sparseforge.methods.base import RuntimeState, param, register
from sparseforge.methods.kernels.base import GateParams, KernelStage


@dataclasses.dataclass
class SparseKernelParams(GateParams):
    kernel: str = param("csr", "sparse kernel that multiplies the routed projections", kernel_names)


@register
class SparseKernel(KernelStage):
    name = "sparse-kernel"
    summary = "multiply pruned projections through a sparse kernel wherever a speed gate measured at compress time finds it faster"
    Params = SparseKernelParams

    @classmethod
    def example_params(cls) -> dict:
        return {"kernel": "csr", "token_counts": [1, 8], "repeats": 1, "warmup": 0}

    def calibrate(self, model, context) -> RuntimeState:
        from sparseforge.core.dispatch import restore_dense, use_sparse_kernel

        _refuse_second_stage(model)
        p = self.params
        # Routing once measures the gate on exactly the projections attach will route; then undo it.
        routed = use_sparse_kernel(model, p.kernel, targets=context.targets, ignore=context.ignore,
                                   token_counts=p.token_counts, repeats=p.repeats, warmup=p.warmup)
        restore_dense(model)
        gate = dataclasses.replace(routed["gate"], margin=p.margin)
        return RuntimeState(data={"gate": gate.to_dict(), "targets": list(context.targets), "ignore": list(context.ignore)})

    def attach(self, model, state: RuntimeState) -> None:
        from sparseforge.core.dispatch import use_sparse_kernel

        _refuse_second_stage(model)
        data = state.data
        targets, ignore = data.get("targets", ["*"]), data.get("ignore", [])
        if not isinstance(targets, list) or not isinstance(ignore, list) or "gate" not in data:
            raise UserInputError("sparse-kernel state needs 'gate' (a speed gate) and 'targets'/'ignore' lists; re-create the artifact")
        routed = use_sparse_kernel(model, self.params.kernel, gate=SpeedGate.from_dict(data["gate"]), targets=targets, ignore=ignore)
        self.projections, self.gate = routed["replaced"], routed["gate"]

    def detach(self, model) -> None:
        from sparseforge.core.dispatch import restore_dense

        restore_dense(model)  # this stage is the only one routing projections (see _refuse_second_stage)

    def report(self, state: RuntimeState) -> dict:
        choices = list(self.gate.choices().values())
        return {"kernel": self.params.kernel, "projections": list(self.projections),
                "sparse_cases": choices.count("sparse"), "measured_cases": len(choices)}


def _refuse_second_stage(model) -> None:
    # detach restores every SparseLinear, so two kernel stages could not be undone one at a time.
    if any(isinstance(m, SparseLinear) for m in model.modules()):
        raise UserInputError("the model's projections already run through a sparse kernel (one sparse-kernel stage per model); "
                             "drop the second one (or --kernel on a model whose artifact has one)")
