"""Sparse matrix-product kernels behind a measured speed gate.

A `SparseKernel` is one storage format for a pruned weight plus the product that uses it (2:4 semi-structured
on NVIDIA GPUs, CSR for unstructured sparsity on CPU). Whether the sparse product beats the dense one depends on
the weight's shape, how sparse it is and how many tokens are multiplied at once (a decode step multiplies one),
so nothing is assumed: `SpeedGate` holds timings of both products per kernel key and token count, measured on
the machine that runs them, and `SparseLinear` asks it on every call. Where the gate has no entry, or the sparse
product was not faster by the margin, the dense `F.linear` runs, which is also the reference the sparse paths
are tested against.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.errors import UserInputError


class SparseKernel:
    """A compressed weight format and its product. Subclasses set `name` and implement the methods below."""

    name: str = ""
    summary: str = ""

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this PyTorch build can run the sparse product on `device` in `dtype`."""
        raise NotImplementedError

    def accepts(self, weight: torch.Tensor) -> bool:
        """Whether `weight` ([out, in]) has the pattern this format stores (checked before a layer is swapped)."""
        raise NotImplementedError

    def key(self, weight: torch.Tensor) -> str:
        """The speed-gate key of `weight`: what its speed depends on besides the token count (shape, density)."""
        return f"{weight.shape[0]}x{weight.shape[1]}"

    def example_weight(self, key: str, generator: torch.Generator) -> torch.Tensor:
        """A random float32 CPU weight with this key, to time the products when measuring a gate."""
        raise NotImplementedError

    def compress(self, weight: torch.Tensor):
        """The compressed copy of `weight` that `matmul` multiplies with."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, compressed) -> torch.Tensor:
        """x [tokens, in] times the compressed weight transposed: [tokens, out], like F.linear without bias."""
        raise NotImplementedError


KERNELS: dict[str, SparseKernel] = {}


def register_kernel(cls: type[SparseKernel]) -> type[SparseKernel]:
    if cls.name in KERNELS and type(KERNELS[cls.name]) is not cls:
        raise ValueError(f"kernel name '{cls.name}' registered twice")
    KERNELS[cls.name] = cls()
    return cls


def get_kernel(name: str) -> SparseKernel:
    import sparseforge.kernels  # noqa: F401  (importing the package registers every kernel)

    if name not in KERNELS:
        raise UserInputError(f"unknown sparse kernel '{name}'; choose one of {', '.join(kernel_names())}")
    return KERNELS[name]


def kernel_names() -> tuple[str, ...]:
    """Every registered kernel's name, sorted: the choices the CLI and the sparse-kernel stage offer."""
    import sparseforge.kernels  # noqa: F401

    return tuple(sorted(KERNELS))


def parse_shape(key: str) -> tuple[int, int]:
    """(out, in) from a key that starts with "OUTxIN"."""
    try:
        out_f, in_f = key.split("@")[0].split("x")
        return int(out_f), int(in_f)
    except ValueError:
        raise UserInputError(f"speed gate key '{key}' does not start with OUTxIN, e.g. '4096x4096'") from None


def _bucket(tokens: int, measured: list[int]) -> int:
    """The measured token count that stands for `tokens`: the smallest one at least as large, else the largest."""
    larger = [t for t in measured if t >= tokens]
    return min(larger) if larger else max(measured)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device | str = "cpu") -> float:
    """Median wall seconds per call after `warmup` untimed calls; CUDA work is synchronized around each call."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclasses.dataclass
class SpeedGate:
    """Which product to use per (kernel key, tokens); keys never measured use the dense product.

    `timings` maps a kernel key ("OUTxIN" for 2:4, "OUTxIN@SPARSITY" for CSR) to {tokens: {"dense_s": ...,
    "sparse_s": ...}}. The sparse product is chosen only where it was faster than dense by more than `margin`
    (a fraction), so timing noise does not flip decisions."""

    timings: dict[str, dict[int, dict[str, float]]] = dataclasses.field(default_factory=dict)
    margin: float = 0.05
    kernel: str = ""

    def choose(self, key: str, tokens: int) -> str:
        per_tokens = self.timings.get(key)
        if not per_tokens:
            return "dense"
        t = per_tokens[_bucket(tokens, sorted(per_tokens))]
        return "sparse" if t["sparse_s"] < (1 - self.margin) * t["dense_s"] else "dense"

    def choices(self) -> dict[tuple[str, int], str]:
        """The decision for every measured (key, tokens): "sparse" or "dense"."""
        return {(key, tokens): self.choose(key, tokens) for key, per in self.timings.items() for tokens in per}

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "margin": self.margin,
                "timings": {s: {str(k): v for k, v in d.items()} for s, d in self.timings.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "SpeedGate":
        try:
            timings = {s: {int(k): {"dense_s": float(v["dense_s"]), "sparse_s": float(v["sparse_s"])} for k, v in d.items()}
                       for s, d in data["timings"].items()}
            return cls(timings, float(data.get("margin", 0.05)), str(data.get("kernel", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserInputError(f"speed gate data is malformed ({exc!r}); re-measure it with SpeedGate.measure") from None

    @classmethod
    def measure(cls, kernel: str | SparseKernel, keys, token_counts, device="cpu", dtype=torch.float32,
                repeats: int = 20, warmup: int = 5, margin: float = 0.05) -> "SpeedGate":
        """Time dense `F.linear` and the kernel's product for each key (on a random weight with that key) and
        token count, on random inputs, in this process."""
        kernel = get_kernel(kernel) if isinstance(kernel, str) else kernel
        device = torch.device(device)
        if not kernel.supports(device, dtype):
            raise UserInputError(f"the '{kernel.name}' kernel cannot run on {device} in {dtype}: {kernel.summary}")
        gate = cls(margin=margin, kernel=kernel.name)
        for key in keys:
            g = torch.Generator(device="cpu").manual_seed(0)
            w = kernel.example_weight(key, g).to(device, dtype)
            compressed = kernel.compress(w)
            per_tokens = {}
            for tokens in token_counts:
                x = torch.randn(int(tokens), w.shape[1], generator=g).to(device, dtype)
                per_tokens[int(tokens)] = {
                    "dense_s": median_seconds(lambda: F.linear(x, w), repeats, warmup, device),
                    "sparse_s": median_seconds(lambda: kernel.matmul(x, compressed), repeats, warmup, device),
                }
            gate.timings[key] = per_tokens
        return gate


class GatedLinear(nn.Linear):
    """Shared by the kernel-backed linear layers: the weight and bias are the replaced layer's own parameters, and
    each token count's choice between the kernel and the dense `F.linear` is asked of the gate once and cached.
    Subclasses set `kernel`, `gate_key` and `gate` and say what the kernel multiplies (`kernel_operand`)."""

    def _share(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a fresh weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    @property
    def gate(self) -> SpeedGate:
        return self._gate

    @gate.setter
    def gate(self, gate: SpeedGate) -> None:
        self._gate = gate
        self._decisions = {}  # (tokens, ...) -> decision; a decode step asks the same question every call

    def _apply(self, fn, *args, **kwargs):
        self._decisions = {}  # .to() / .half() / .cuda(): device or dtype may change what can run
        return super()._apply(fn, *args, **kwargs)

    def decide(self, tokens: int, *key):
        """The uncached decision for a call of `tokens` tokens (True: the kernel). Subclasses whose gate knows
        more than the token count, or more paths than two, override it; `key` is what else the decision depends on."""
        w = self.weight
        return self.kernel.supports(w.device, w.dtype) and self.gate.choose(self.gate_key, tokens) == "sparse"

    def decision(self, tokens: int, *key):
        """`decide`, asked once per (tokens, *key) until the gate, device or dtype changes."""
        answer = self._decisions.get((tokens, *key))
        if answer is None:
            answer = self._decisions[(tokens, *key)] = self.decide(tokens, *key)
        return answer

    def uses_kernel(self, tokens: int) -> bool:
        return self.decision(tokens)

    def kernel_operand(self):
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        if (torch.is_grad_enabled() and self.weight.requires_grad) or not self.uses_kernel(tokens):
            return F.linear(x, self.weight, self.bias)  # training needs the dense weight's gradient
        y = self.kernel.matmul(x.reshape(tokens, self.in_features), self.kernel_operand())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, kernel={self.kernel.name}"


class SparseLinear(GatedLinear):
    """An nn.Linear whose product goes through a sparse kernel where its gate says that pays, dense elsewhere.

    It shares the parameters of the layer it replaces (same names, shapes and values), so state dicts, saved
    checkpoints and compression methods see an ordinary linear layer. The compressed copy is built on first
    sparse use and rebuilt whenever the weight changes (its version counter moves) or moves device or dtype;
    it is extra memory next to the dense weight, not a replacement for it."""

    def __init__(self, linear: nn.Linear, kernel: SparseKernel, gate: SpeedGate):
        if not kernel.accepts(linear.weight.data):
            raise UserInputError(f"this weight does not have the pattern the '{kernel.name}' kernel stores; {kernel.summary}")
        self._share(linear)
        self.kernel = kernel
        self.gate_key = kernel.key(linear.weight.data)
        self.gate = gate
        self._compressed = None
        self._compressed_for = None

    def __getstate__(self):
        # Copies and pickles rebuild the compressed weight on first use (sparse CSR tensors cannot be deep-copied).
        state = self.__dict__.copy()
        state["_compressed"] = state["_compressed_for"] = None
        return state

    def compressed_weight(self):
        w = self.weight
        version = (w.device, w.dtype, w.data_ptr(), w._version)
        if self._compressed_for != version:
            self._compressed = self.kernel.compress(w.detach().contiguous())
            self._compressed_for = version
        return self._compressed

    def uses_sparse(self, tokens: int) -> bool:
        return self.uses_kernel(tokens)

    def kernel_operand(self):
        return self.compressed_weight()
