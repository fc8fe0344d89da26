"""Weight-only integer products on CPU through PyTorch's own operators, behind the speed gate.

- int8: `torch._weight_int8pack_mm(x, int8 codes [out, in], scales [out])`, one scale per output row with signed
  codes and no zero point. GPTQ's unsigned code q with integer zero point z reads w = s (q - z) = s (q - 128) +
  s (128 - z): the first term is the operator's signed code q - 128, the second a per-row constant times the
  sum of x, added after the product (0 for symmetric codes).
- int4: `torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros [in/g, out, 2])` reads
  w = (q - 8) s + zf, a zero point in the float domain; GPTQ's w = s (q - z) gives zf = (8 - z) s (tested in
  tests/test_quant_kernels.py). Groups of 32 to 256 columns, out a multiple of 16.

Both operators take bfloat16 activations for speed (their float32 activation path is much slower on CPU), so
the products cast x to bfloat16 and the result back; the
scales travel in bfloat16 too. The reference each is tested against is `F.linear(x, dequantized weight)`.
`QuantLinear` swaps in for an `nn.Linear` whose weight has recorded codes (core/quantizer.py) and asks its
gate per token count, falling back to the dense product on the dequantized weight, which it keeps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.core.quantizer import QuantizedWeight, QuantScheme, quantize_rtn
from sparseforge.errors import UserInputError
from sparseforge.kernels.base import GatedLinear, SpeedGate, median_seconds, parse_shape


# Their own registry, not kernels.base.KERNELS: a sparse kernel compresses whatever float weight it is handed,
# while these multiply recorded codes, so the sparse-kernel stage must never offer them.
QUANT_KERNELS: dict[str, "WeightOnlyKernel"] = {}


def register_quant_kernel(cls):
    QUANT_KERNELS[cls.name] = cls()
    return cls


class WeightOnlyKernel:
    """A quantized-weight product: `pack(qw)` turns recorded codes into the operator's layout, `matmul(x, packed)`
    is x [tokens, in] times the dequantized weight transposed, like F.linear without bias."""

    name: str = ""
    summary: str = ""

    def supports(self, device, dtype) -> bool:
        return torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)

    def accepts_quantized(self, qw: QuantizedWeight) -> bool:
        raise NotImplementedError

    def key_for(self, qw: QuantizedWeight) -> str:
        """The speed-gate key: shape and scheme, e.g. "4096x11008@w4g128"."""
        return f"{qw.shape[0]}x{qw.shape[1]}@{qw.scheme}"

    def pack(self, qw: QuantizedWeight):
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, packed) -> torch.Tensor:
        raise NotImplementedError


@register_quant_kernel
class Int8WeightOnly(WeightOnlyKernel):
    name = "int8-weight"
    summary = "8-bit codes with one scale per output row (group_size 0), symmetric or asymmetric; CPU, bfloat16 activations"
    scheme = QuantScheme(8, True, 0)

    def accepts_quantized(self, qw):
        # torch 2.13's CPU `_weight_int8pack_mm` returns wrong sums (or crashes) for some input widths that are not a
        # multiple of 16 (e.g. 100 at one token, 24 at four), so those projections keep the dense product.
        return (qw.scheme.bits == 8 and qw.scheme.group_size in (0, qw.shape[1]) and qw.outliers is None
                and qw.shape[1] % 16 == 0)

    def pack(self, qw):
        signed = (qw.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        scale = qw.scale[:, 0]
        offset = (128 - qw.zero[:, 0]) * scale  # 0 for symmetric codes
        return {"codes": signed, "scale": scale.to(torch.bfloat16), "offset": offset.to(torch.bfloat16) if bool((offset != 0).any()) else None}

    def matmul(self, x, packed):
        xb = x.to(torch.bfloat16)
        y = torch._weight_int8pack_mm(xb, packed["codes"], packed["scale"])
        if packed["offset"] is not None:
            y = y + xb.sum(-1, keepdim=True) * packed["offset"]
        return y.to(x.dtype)


@register_quant_kernel
class Int4WeightOnly(WeightOnlyKernel):
    name = "int4-weight"
    summary = "4-bit codes in groups of 32, 64, 128 or 256 columns (output rows a multiple of 16); CPU, bfloat16 activations"
    scheme = QuantScheme(4, True, 128)
    GROUPS = (32, 64, 128, 256)

    def accepts_quantized(self, qw):
        rows, cols = qw.shape
        g = qw.scheme.group_size
        return qw.scheme.bits == 4 and g in self.GROUPS and cols % g == 0 and rows % 16 == 0 and qw.outliers is None

    def pack(self, qw):
        packed = torch._convert_weight_to_int4pack_for_cpu(qw.codes.to(torch.int32).contiguous(), 2)
        float_zero = (8 - qw.zero) * qw.scale  # GPTQ's integer zero point in the operator's float domain
        scales_and_zeros = torch.stack([qw.scale.t(), float_zero.t()], dim=-1).contiguous().to(torch.bfloat16)
        return {"packed": packed, "group_size": qw.scheme.group_size, "scales_and_zeros": scales_and_zeros}

    def matmul(self, x, packed):
        y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), packed["packed"], packed["group_size"], packed["scales_and_zeros"])
        return y.to(x.dtype)


def kernel_for(qw: QuantizedWeight) -> WeightOnlyKernel | None:
    """The registered weight-only kernel that can multiply `qw`, or None (then the dense product runs)."""
    return next((k for k in QUANT_KERNELS.values() if k.accepts_quantized(qw)), None)


class QuantLinear(GatedLinear):
    """An nn.Linear whose weight is exactly its recorded codes, multiplied through a weight-only kernel where its
    gate measured that faster and densely elsewhere. Shares the replaced layer's parameters, so state dicts
    and checkpoints are unchanged; the packed codes are extra memory next to the dense weight."""

    def __init__(self, linear: nn.Linear, qw: QuantizedWeight, kernel: WeightOnlyKernel, gate: SpeedGate):
        if tuple(linear.weight.shape) != qw.shape:
            raise UserInputError(f"recorded codes of shape {qw.shape} do not match the layer's weight {tuple(linear.weight.shape)}; re-create the artifact")
        self._share(linear)
        self.kernel, self.gate = kernel, gate
        self.gate_key = kernel.key_for(qw)
        self.packed = kernel.pack(qw)

    def kernel_operand(self):
        return self.packed


def scheme_from_key(key: str) -> QuantScheme:
    """The scheme a gate key names ("OUTxIN@w4g128", "@w8pc-asym"): the inverse of QuantScheme.__str__."""
    import re

    match = re.fullmatch(r"w(\d+)(?:g(\d+)|pc)(-asym)?", key.split("@", 1)[-1])
    if not match:
        raise UserInputError(f"speed gate key '{key}' does not name a quantization scheme such as 4096x4096@w4g128")
    return QuantScheme(int(match.group(1)), match.group(3) is None, int(match.group(2) or 0))


def measure_gate(keys, token_counts, dtype=torch.float32, repeats: int = 10, warmup: int = 3, margin: float = 0.05) -> SpeedGate:
    """Time the dense product (F.linear in `dtype`) against the weight-only kernel per key (a random weight
    rounded with the key's scheme) and token count, alternating the two, in this process. Keys no kernel
    accepts get no timings (so the dense product runs)."""
    gate = SpeedGate(margin=margin, kernel="weight-only")
    for key in keys:
        out_f, in_f = parse_shape(key)
        g = torch.Generator().manual_seed(0)
        qw = quantize_rtn(torch.randn(out_f, in_f, generator=g) * 0.02, scheme_from_key(key))
        kernel = kernel_for(qw)
        if kernel is None:
            continue
        w, packed = qw.dequantize().to(dtype), kernel.pack(qw)
        per_tokens = {}
        for tokens in token_counts:
            x = torch.randn(int(tokens), in_f, generator=g).to(dtype)
            dense, fast = [], []
            for _ in range(3):  # alternate, so a burst of load on a shared machine hits both
                dense.append(median_seconds(lambda: F.linear(x, w), repeats, warmup))
                fast.append(median_seconds(lambda: kernel.matmul(x, packed), repeats, warmup))
            per_tokens[int(tokens)] = {"dense_s": sorted(dense)[1], "sparse_s": sorted(fast)[1]}
        gate.timings[key] = per_tokens
    return gate
