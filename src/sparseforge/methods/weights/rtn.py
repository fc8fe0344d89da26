"""Round to nearest (RTN): min-max groups, no calibration data. The baseline the calibrated quantizers beat."""
from __future__ import annotations

from sparseforge.core.obs import ObsResult
from sparseforge.core.quantizer import quantize_rtn
from sparseforge.methods.base import register
from sparseforge.methods.weights.quant_base import WeightQuantizer


@register
class RTN(WeightQuantizer):
    name = "rtn"
    summary = "round each weight to the nearest code of its group's min-max grid (2/3/4/8 bits); needs no calibration data"

    def quantize_projection(self, weight, stats):
        qw = quantize_rtn(weight, self.scheme)
        return ObsResult(qw.dequantize(), qw)
