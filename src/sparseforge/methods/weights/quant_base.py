"""Weight quantization family. A quantizer implements only `quantize_projection(weight, stats) -> ObsResult`
(the new float weight and its `QuantizedWeight`); the layer-by-layer walk, the optional embedding rounding and
the record that storage and kernels read (`core.quantizer.quantized_weights(model)`) are shared here."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from sparseforge.core.calibration import CalibrationConfig, calibration_batches, matrices, run_layerwise
from sparseforge.core.obs import ObsResult
from sparseforge.core.quantizer import BITS, QuantScheme, quantize_rtn, record_quantized
from sparseforge.errors import UserInputError
from sparseforge.methods.base import Method, param
from sparseforge.methods.weights.base import StageResult


@dataclasses.dataclass
class QuantParams:
    bits: int = param(4, "bits per weight code: 2, 3, 4 or 8")
    group_size: int = param(128, "input columns sharing one scale and zero point; 0 = one group per output row (per channel)")
    symmetric: bool = param(True, "symmetric codes (zero point fixed at the middle) or asymmetric (min-max zero point)")
    embedding_bits: int = param(0, "also round the input embeddings (and an LM head tied to them) to this many bits, per row in "
                                   "groups of group_size, without calibration; 0 keeps them in float")


@dataclasses.dataclass
class QuantStageResult(StageResult):
    quant: dict | None = None  # the scheme: bits, group_size, symmetric (+ method specifics)


class WeightQuantizer(Method):
    family: ClassVar[str] = "weights"
    Params: ClassVar[type] = QuantParams
    needs_stats: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        QuantScheme(params.bits, params.symmetric, params.group_size).check(where)
        if params.embedding_bits not in (0, *BITS):
            raise UserInputError(f"{where}embedding_bits {params.embedding_bits} must be 0 (keep float) or one of {', '.join(map(str, BITS))}")

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.params.bits, self.params.symmetric, self.params.group_size)

    pattern_name: ClassVar[str] = "dense"  # what the stage leaves besides rounding (the joint method: its sparsity pattern)

    def quantize_projection(self, weight: torch.Tensor, stats) -> ObsResult:
        raise NotImplementedError

    def report_quant(self) -> dict:
        return self.scheme.to_json() | {"embedding_bits": self.params.embedding_bits}

    def apply(self, model, tokenizer=None, targets=("*",), ignore=(), calibration: CalibrationConfig | None = None, progress=True) -> StageResult:
        calibration = calibration or CalibrationConfig()
        batches = calibration_batches(tokenizer, calibration) if self.needs_stats else None
        done: list[str] = []
        records = {}

        def quantize_layer(index, layer, projections, stats):
            for name, proj in projections.items():
                w = proj.weight()
                if w.dim() == 2:
                    result = self.quantize_projection(w.float(), stats.get(name))
                    proj.set_weight(result.weight.to(w.dtype))
                    records[proj.state_key] = result.quantized
                else:
                    # A fused expert stack, expert by expert with its own statistics. Its codes are not recorded:
                    # packed storage and the integer kernels read 2-D weights, so the stack keeps its
                    # dequantized values in float (exactly on each expert's grid).
                    for e, we, se in matrices(w, stats.get(name)):
                        we.copy_(self.quantize_projection(we.float(), se).weight.to(w.dtype))
                done.append(name)

        routing = run_layerwise(model, quantize_layer, targets, ignore, batches, self.needs_stats, calibration, progress, desc=self.name)
        if self.params.embedding_bits:
            records.update(_round_embeddings(model, QuantScheme(self.params.embedding_bits, self.params.symmetric, self.params.group_size)))
        record_quantized(model, records)
        return QuantStageResult(self.name, self.pattern_name, "none", done, None, routing, quant=self.report_quant())


def _round_embeddings(model, scheme: QuantScheme) -> dict:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or getattr(emb, "weight", None) is None or emb.weight.dim() != 2:
        raise UserInputError("embedding_bits needs a model with a 2-D input embedding matrix; set embedding_bits: 0")
    key = next(f"{n}.weight" for n, m in model.named_modules() if m is emb)
    qw = quantize_rtn(emb.weight.data, scheme)
    emb.weight.data.copy_(qw.dequantize().to(emb.weight.dtype))  # a tied LM head shares this tensor
    return {key: qw}
