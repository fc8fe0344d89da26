"""2:4 semi-structured sparse matrix products on NVIDIA GPUs (PyTorch's `to_sparse_semi_structured`,
cuSPARSELt or CUTLASS underneath), behind a speed gate.

A 2:4 weight stores half its values plus 2-bit positions, and Ampere-or-newer tensor cores multiply it at up to
twice the dense rate, but only when the product is large enough: for a few tokens (decode) the sparse kernel's
fixed costs make it slower than the dense one. `SpeedGate` holds, per weight shape and token count, which of
the two was faster when timed on this machine, and `SemiStructuredLinear` asks it on every call. The dense
weight stays the module's parameter (the reference path, what is saved, and the fallback on CPU or where the
gate says dense); the compressed copy lives next to it on the GPU, so memory grows by about 0.56x of the
weight rather than shrinking.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.errors import UserInputError


def semi_structured_supported(device: torch.device | str | None = None) -> bool:
    """Whether this PyTorch and this device can run 2:4 sparse products (CUDA, compute capability 8.0 or newer)."""
    if not torch.cuda.is_available() or not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False
    device = torch.device(device or "cuda")
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def is_2of4(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive input weights of every row."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def _bucket(tokens: int, measured: list[int]) -> int:
    """The measured token count that stands for `tokens`: the smallest one at least as large, else the largest."""
    larger = [t for t in measured if t >= tokens]
    return min(larger) if larger else max(measured)


@dataclasses.dataclass
class SpeedGate:
    """Which kernel to use per (out_features, in_features, tokens); unmeasured shapes use the dense kernel.

    `timings` maps "OUTxIN" to {tokens: {"dense_s": ..., "sparse_s": ...}}. The sparse kernel is chosen only
    where it was faster than dense by more than `margin` (a fraction), so noise does not flip decisions."""

    timings: dict[str, dict[int, dict[str, float]]] = dataclasses.field(default_factory=dict)
    margin: float = 0.05

    def choose(self, out_features: int, in_features: int, tokens: int) -> str:
        per_tokens = self.timings.get(f"{out_features}x{in_features}")
        if not per_tokens:
            return "dense"
        t = per_tokens[_bucket(tokens, sorted(per_tokens))]
        return "sparse" if t["sparse_s"] < (1 - self.margin) * t["dense_s"] else "dense"

    def to_dict(self) -> dict:
        return {"margin": self.margin, "timings": {s: {str(k): v for k, v in d.items()} for s, d in self.timings.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "SpeedGate":
        try:
            timings = {s: {int(k): {"dense_s": float(v["dense_s"]), "sparse_s": float(v["sparse_s"])} for k, v in d.items()}
                       for s, d in data["timings"].items()}
            return cls(timings, float(data.get("margin", 0.05)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserInputError(f"speed gate data is malformed ({exc!r}); re-measure it with SpeedGate.measure") from None

    @classmethod
    def measure(cls, shapes, token_counts, device="cuda", dtype=torch.float16, repeats: int = 20, warmup: int = 5,
                margin: float = 0.05) -> "SpeedGate":
        """Time dense vs. 2:4 sparse `F.linear` for each (out, in) shape and token count on random inputs."""
        if not semi_structured_supported(device):
            raise UserInputError("2:4 sparse kernels need a CUDA GPU of compute capability 8.0 or newer; on other devices the dense path is used")
        gate = cls(margin=margin)
        for out_f, in_f in shapes:
            g = torch.Generator(device="cpu").manual_seed(0)
            w = torch.randn(out_f, in_f, generator=g).to(device, dtype)
            w = w * random_2of4_mask(out_f, in_f, g).to(device)
            sparse = torch.sparse.to_sparse_semi_structured(w)
            per_tokens = {}
            for tokens in token_counts:
                x = torch.randn(tokens, in_f, generator=g).to(device, dtype)
                per_tokens[int(tokens)] = {"dense_s": _time(lambda: F.linear(x, w), repeats, warmup),
                                           "sparse_s": _time(lambda: F.linear(x, sparse), repeats, warmup)}
            gate.timings[f"{out_f}x{in_f}"] = per_tokens
        return gate


def random_2of4_mask(rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random boolean mask keeping 2 of every 4 consecutive entries in each row."""
    scores = torch.rand(rows, cols // 4, 4, generator=generator)
    keep = scores.argsort(-1)[..., 2:]
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
    mask.scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def _time(fn, repeats: int, warmup: int) -> float:
    """Median seconds per call; CUDA work is synchronized around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class SemiStructuredLinear(nn.Module):
    """A linear layer with a 2:4 weight that multiplies through the sparse kernel where the gate says it pays.

    Its parameters are exactly those of the nn.Linear it replaces (same names, shapes and values), so state
    dicts and saved checkpoints are unchanged."""

    def __init__(self, linear: nn.Linear, gate: SpeedGate):
        super().__init__()
        if not is_2of4(linear.weight.data):
            raise UserInputError("SemiStructuredLinear needs a 2:4 weight (at most 2 nonzeros in every 4 inputs); prune it with a 2:4 recipe first")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.gate = gate
        self._sparse = None  # compressed copy, built on first use on a supported device
        self._sparse_key = None

    def _sparse_weight(self):
        key = (self.weight.device, self.weight.dtype, self.weight.data_ptr(), self.weight._version)
        if self._sparse_key != key:
            self._sparse = torch.sparse.to_sparse_semi_structured(self.weight.detach().contiguous())
            self._sparse_key = key
        return self._sparse

    def uses_sparse(self, tokens: int) -> bool:
        return (
            self.weight.dtype in (torch.float16, torch.bfloat16)
            and semi_structured_supported(self.weight.device)
            and self.gate.choose(self.out_features, self.in_features, tokens) == "sparse"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        if not self.uses_sparse(tokens):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(tokens, self.in_features)
        return F.linear(flat, self._sparse_weight(), self.bias).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, 2:4"
