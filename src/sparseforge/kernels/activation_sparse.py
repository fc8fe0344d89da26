"""Activation-sparse products: skip the weight rows whose input channel is zeroed.

At decode time a projection multiplies one token (or a few) by its weight, and the product is bound by reading
the weight from memory. When an input channel j is zero for every token of the call, weight column j is not
needed at all; stored input-major (the transposed weight `wt`, [in, out]) that column is one contiguous row, so
the product reads only the active rows and its floor falls with the activation density: 1/(1-s) faster at
sparsity s. The threshold is fused: the kernel reads x, keeps x_j where |x_j| > threshold_j and accumulates
x_j * wt[j, :] for the kept channels only.

- `reference_product` is the pure-PyTorch definition (mask, then the dense product): every fast path is tested
  against it, and it runs wherever the fast path cannot.
- `row_skip_product` is the CPU kernel: a small C++ extension compiled on first use by
  `torch.utils.cpp_extension` with the system's C++ compiler (gcc), cached under torch's extensions folder.
  Why C++ rather than numba or `torch.compile`: see docs/methods/activations.md (measured by
  benchmarks/activation_kernel.py); in short, the kernel is a data-dependent gather of rows that neither numba
  (no bfloat16, no ATen thread pool, another heavy dependency) nor Inductor (no dynamic row skipping) expresses
  well, while 60 lines of C++ reach the memory floor. With no compiler, `available()` is False, the reference
  path runs and one warning says so.
- `ActivationGate` keys timings by shape, dtype, token count and density bucket, measured on this machine; the
  sparse path runs only where it measured faster than the dense product.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading

import torch
import torch.nn.functional as F

from sparseforge.errors import UserInputError
from sparseforge.kernels.base import median_seconds

log = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.bfloat16)  # what the C++ kernel reads; others take the reference path
DENSITY_STEP = 0.1  # gate buckets: density rounded UP to this step, so a call is never credited with a sparser timing

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

#if defined(__AVX512F__)
// 16 weights of one row as float32.
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif
static inline float load1(const float* p) { return *p; }
static inline float load1(const uint16_t* p) { return bf16_to_float(*p); }

// y[o0:o1] += a0*r0 + a1*r1 + a2*r2 + a3*r3 over the slice (r* point at row starts).
// `pf` (or null): four rows to prefetch at the same offsets, one cache line per row every 64 bytes of weights.
template <typename W>
static inline void axpy4(float* __restrict__ y, const W* r0, const W* r1, const W* r2, const W* r3,
                         float a0, float a1, float a2, float a3, int64_t o0, int64_t o1, const W* const* pf) {
  int64_t o = o0;
  constexpr int64_t LINE = 64 / sizeof(W);
#if defined(__AVX512F__)
  const __m512 v0 = _mm512_set1_ps(a0), v1 = _mm512_set1_ps(a1), v2 = _mm512_set1_ps(a2), v3 = _mm512_set1_ps(a3);
  for (; o + 16 <= o1; o += 16) {
    if (pf && (o % LINE) == 0)
      for (int i = 0; i < 4; ++i) __builtin_prefetch(pf[i] + o, 0, 1);
    const __m512 s01 = _mm512_fmadd_ps(v1, load16(r1 + o), _mm512_mul_ps(v0, load16(r0 + o)));
    const __m512 s23 = _mm512_fmadd_ps(v3, load16(r3 + o), _mm512_mul_ps(v2, load16(r2 + o)));
    _mm512_storeu_ps(y + o, _mm512_add_ps(_mm512_loadu_ps(y + o), _mm512_add_ps(s01, s23)));
  }
#endif
  for (; o < o1; ++o) y[o] += a0 * load1(r0 + o) + a1 * load1(r1 + o) + a2 * load1(r2 + o) + a3 * load1(r3 + o);
}

template <typename W>
static void accumulate(const W* wt, const std::vector<int64_t>& rows, const std::vector<float>& vals,
                       float* y, int64_t T, int64_t out) {
  // Each thread owns one contiguous slice of the output columns and streams its part of every active row, four
  // rows per pass; the slice is walked in chunks that stay in L1 while every token uses them.
  const int64_t n = static_cast<int64_t>(rows.size());
  const int64_t padded = (n + 3) / 4 * 4;
  constexpr int64_t CHUNK = 512;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(64, ((out + threads - 1) / threads + 15) / 16 * 16);
  // A zero row for the padding of the last group (its coefficient is zero too).
  std::vector<W> zero(out, W(0));
  at::parallel_for(0, out, grain, [&](int64_t s0, int64_t s1) {
    for (int64_t k = 0; k < padded; k += 4) {
      const W* r[4];
      float a[4];
      for (int i = 0; i < 4; ++i) r[i] = k + i < n ? wt + rows[k + i] * out : zero.data();
      // The next group's rows are elsewhere in memory and hardware prefetchers stop at page boundaries: ask
      // for them a line at a time while this group is summed.
      const W* p[4] = {r[0], r[1], r[2], r[3]};
      for (int i = 0; i < 4; ++i) if (k + 4 + i < n) p[i] = wt + rows[k + 4 + i] * out;
      const bool ahead = k + 4 < n;
      for (int64_t c = s0; c < s1; c += CHUNK) {
        const int64_t e = std::min(s1, c + CHUNK);
        for (int64_t t = 0; t < T; ++t) {
          for (int i = 0; i < 4; ++i) a[i] = k + i < n ? vals[(k + i) * T + t] : 0.0f;
          axpy4(y + t * out, r[0], r[1], r[2], r[3], a[0], a[1], a[2], a[3], c, e, (t == 0 && ahead) ? p : nullptr);
        }
      }
    }
  });
}

// x [T, in] (float32 or bfloat16), wt [in, out] (same dtype, contiguous), thr [in] float32.
// Channel j is active when |x[t, j]| > thr[j] for some token t; masked-out entries of active rows are zero.
std::vector<torch::Tensor> row_skip(torch::Tensor x, torch::Tensor wt, torch::Tensor thr) {
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 2 && x.size(1) == wt.size(0), "row_skip: shapes do not match");
  TORCH_CHECK(thr.scalar_type() == torch::kFloat32 && thr.numel() == wt.size(0), "row_skip: thr must be float32 [in]");
  auto xf = x.to(torch::kFloat32).contiguous();
  auto th = thr.contiguous();
  wt = wt.contiguous();
  const int64_t T = xf.size(0), in = xf.size(1), out = wt.size(1);
  const float* xp = xf.data_ptr<float>();
  const float* tp = th.data_ptr<float>();
  std::vector<int64_t> rows;
  std::vector<float> vals;
  rows.reserve(in);
  vals.reserve(in * T);
  int64_t kept = 0;
  for (int64_t j = 0; j < in; ++j) {
    bool any = false;
    for (int64_t t = 0; t < T; ++t) any |= std::fabs(xp[t * in + j]) > tp[j];
    if (!any) continue;
    rows.push_back(j);
    for (int64_t t = 0; t < T; ++t) {
      const float v = xp[t * in + j];
      const bool keep = std::fabs(v) > tp[j];
      vals.push_back(keep ? v : 0.0f);
      kept += keep;
    }
  }
  auto y = torch::zeros({T, out}, xf.options());
  float* yp = y.data_ptr<float>();
  if (wt.scalar_type() == torch::kFloat32) {
    accumulate(wt.data_ptr<float>(), rows, vals, yp, T, out);
  } else {
    TORCH_CHECK(wt.scalar_type() == torch::kBFloat16, "row_skip: weight must be float32 or bfloat16");
    accumulate(reinterpret_cast<const uint16_t*>(wt.data_ptr<at::BFloat16>()), rows, vals, yp, T, out);
  }
  auto counts = torch::tensor({static_cast<int64_t>(rows.size()), kept}, torch::kInt64);
  return {y.to(x.scalar_type()), counts};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("row_skip", &row_skip, "row-skipping activation-sparse product"); }
"""

_lock = threading.Lock()
_module = None
_failed: str | None = None


def _cpu_tag() -> str:
    """A short key of this CPU (model and instruction-set flags). The kernel is built with -march=native, whose code
    may not run on another CPU, so torch's extension cache must hold one build per kind of CPU."""
    import hashlib
    import platform

    wanted = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")) and line not in wanted:
                    wanted.append(line)
                if len(wanted) >= 2:
                    break
    except OSError:
        wanted = [platform.processor(), platform.machine()]
    return hashlib.sha1("".join(wanted).encode()).hexdigest()[:10]


def _build():
    """Compile (or load from torch's extension cache) the C++ kernel once per process; None when impossible."""
    global _module, _failed
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        if os.environ.get("SPARSEFORGE_NO_CPP_KERNELS"):
            _failed = "SPARSEFORGE_NO_CPP_KERNELS is set"
        else:
            try:
                from torch.utils import cpp_extension

                flags = ["-O3", "-march=native", "-fopenmp"]
                _module = cpp_extension.load_inline(f"sparseforge_row_skip_v5_{_cpu_tag()}", cpp_sources=_SOURCE, extra_cflags=flags,
                                                    extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as exc:  # no compiler, no ninja, no headers: the reference path still works
                _failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        if _failed is not None:
            log.warning("sparseforge: the row-skipping CPU kernel could not be built (%s); activation-sparse projections use the "
                        "reference path (mask, then the dense product), which is correct but not faster. Install a C++ compiler "
                        "(gcc) and ninja to enable it.", _failed)
        return _module


def available() -> bool:
    """Whether the C++ row-skipping kernel can run in this process (builds it on first call)."""
    return _build() is not None


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return torch.device(device).type == "cpu" and dtype in DTYPES and available()


def _as_vector(threshold, in_features: int, device) -> torch.Tensor:
    t = torch.as_tensor(threshold, dtype=torch.float32, device=device)
    return t.expand(in_features).contiguous() if t.dim() == 0 else t.contiguous()


def reference_product(x: torch.Tensor, weight: torch.Tensor, threshold) -> torch.Tensor:
    """x [..., in] with every entry |x_j| <= threshold_j zeroed, times weight [out, in] transposed (F.linear)."""
    t = _as_vector(threshold, weight.shape[1], x.device)
    keep = x.abs() > t.to(x.dtype) if x.dtype != torch.float32 else x.abs() > t
    return F.linear(x * keep, weight)


def row_skip_product(x: torch.Tensor, weight_t: torch.Tensor, threshold) -> tuple[torch.Tensor, int, int]:
    """The row-skipping product of x [tokens, in] with the input-major weight `weight_t` [in, out]; returns
    (y [tokens, out], rows read, entries kept). Accumulates in float32, returns x's dtype."""
    module = _build()
    if module is None:
        raise RuntimeError("the row-skipping kernel is not available; use reference_product")
    t = _as_vector(threshold, weight_t.shape[0], x.device)
    y, counts = module.row_skip(x, weight_t, t)
    return y, int(counts[0]), int(counts[1])


class ActivationKernel:
    """A product for activation-sparse projections: `product(x [tokens, in], weight_t [in, out], threshold)` equals
    `reference_product` with the weight transposed. `supports` says whether it can run here; where it cannot, or its
    gate says dense, `ActivationSparseLinear` takes the reference. Registered by name; the names are the `kernel`
    parameter's choices."""

    name: str = ""
    summary: str = ""

    def supports(self, device, dtype) -> bool:
        raise NotImplementedError

    def product(self, x: torch.Tensor, weight_t: torch.Tensor, threshold) -> torch.Tensor:
        raise NotImplementedError


ACTIVATION_KERNELS: dict[str, ActivationKernel] = {}


def register_activation_kernel(cls: type[ActivationKernel]) -> type[ActivationKernel]:
    if cls.name in ACTIVATION_KERNELS and type(ACTIVATION_KERNELS[cls.name]) is not cls:
        raise ValueError(f"activation kernel '{cls.name}' registered twice")
    ACTIVATION_KERNELS[cls.name] = cls()
    return cls


def activation_kernel_names() -> tuple[str, ...]:
    return tuple(ACTIVATION_KERNELS)


def get_activation_kernel(name: str) -> ActivationKernel:
    if name not in ACTIVATION_KERNELS:
        raise UserInputError(f"unknown activation kernel '{name}'; choose one of {', '.join(ACTIVATION_KERNELS)}")
    return ACTIVATION_KERNELS[name]


@register_activation_kernel
class RowSkip(ActivationKernel):
    name = "row-skip"
    summary = "C++ row-skipping product on CPU, float32 and bfloat16 (built on first use)"

    def supports(self, device, dtype) -> bool:
        return supports(device, dtype)

    def product(self, x, weight_t, threshold):
        return row_skip_product(x, weight_t, threshold)[0]


@register_activation_kernel
class Reference(ActivationKernel):
    name = "reference"
    summary = "mask, then the dense product, everywhere (no speed gate measured)"

    def supports(self, device, dtype) -> bool:
        return False  # it is the fallback itself: nothing to gate


def density_bucket(density: float) -> float:
    """Density rounded up to DENSITY_STEP (0.43 -> 0.5): the timing a call of that density may rely on."""
    return min(1.0, math.ceil(density / DENSITY_STEP - 1e-9) * DENSITY_STEP)


def gate_key(out_f: int, in_f: int, dtype: torch.dtype) -> str:
    return f"{out_f}x{in_f}@{str(dtype).replace('torch.', '')}"


@dataclasses.dataclass
class ActivationGate:
    """Which product to run per (shape and dtype key, tokens, density bucket), from timings on this machine.

    `timings[key][tokens][bucket] = {"dense_s", "sparse_s"}`; a call uses the smallest measured token count at
    least as large as its own (else the largest) and the smallest measured density at least as large as its own
    (else dense); it takes the sparse path only where that was faster than dense by more than `margin`."""

    timings: dict[str, dict[int, dict[float, dict[str, float]]]] = dataclasses.field(default_factory=dict)
    margin: float = 0.05

    def choose(self, key: str, tokens: int, density: float) -> str:
        per_tokens = self.timings.get(key)
        if not per_tokens:
            return "dense"
        counts = sorted(per_tokens)
        bucket_tokens = min((t for t in counts if t >= tokens), default=counts[-1])
        if bucket_tokens < tokens:
            return "dense"  # never measured at this many tokens: do not extrapolate
        per_density = per_tokens[bucket_tokens]
        upper = [d for d in sorted(per_density) if d >= density - 1e-9]
        if not upper:
            return "dense"
        t = per_density[upper[0]]
        return "sparse" if t["sparse_s"] < (1 - self.margin) * t["dense_s"] else "dense"

    def max_density(self, key: str, tokens: int) -> float:
        """The largest measured density at which the sparse path still wins for `tokens` (0 if none): a call whose
        density is known to be above it goes dense without running the kernel's gather."""
        per_tokens = self.timings.get(key) or {}
        counts = sorted(per_tokens)
        bucket_tokens = min((t for t in counts if t >= tokens), default=None)
        if bucket_tokens is None:
            return 0.0
        wins = [d for d in sorted(per_tokens[bucket_tokens]) if self.choose(key, bucket_tokens, d) == "sparse"]
        # Only the prefix of densities where sparse wins at every step counts (timings are noisy).
        best = 0.0
        for d in sorted(per_tokens[bucket_tokens]):
            if d not in wins:
                break
            best = d
        return best

    def to_dict(self) -> dict:
        return {"margin": self.margin,
                "timings": {k: {str(t): {f"{d:.2f}": v for d, v in per.items()} for t, per in pt.items()} for k, pt in self.timings.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "ActivationGate":
        try:
            timings = {k: {int(t): {float(d): {"dense_s": float(v["dense_s"]), "sparse_s": float(v["sparse_s"])} for d, v in per.items()}
                           for t, per in pt.items()} for k, pt in data["timings"].items()}
            return cls(timings, float(data.get("margin", 0.05)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserInputError(f"activation speed gate data is malformed ({exc!r}); re-create the artifact") from None

    @classmethod
    def measure(cls, shapes, dtype=torch.float32, token_counts=(1, 2, 4, 8), densities=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                repeats: int = 7, warmup: int = 2, margin: float = 0.05, kernel: "ActivationKernel | str" = "row-skip") -> "ActivationGate":
        """Time dense `F.linear` and the row-skipping product on random weights of each (out, in) shape, on inputs
        whose channels are active at each density, each token its own channels (the worst case for several tokens: a
        row is read when any token keeps it), alternating the two so load on the machine hits both alike. Empty gate
        when the kernel is unavailable."""
        gate = cls(margin=margin)
        kernel = get_activation_kernel(kernel) if isinstance(kernel, str) else kernel
        if not kernel.supports("cpu", dtype):
            return gate
        g = torch.Generator().manual_seed(0)
        for out_f, in_f in dict.fromkeys((int(o), int(i)) for o, i in shapes):
            w = torch.randn(out_f, in_f, generator=g).to(dtype)
            wt = w.t().contiguous()
            key = gate_key(out_f, in_f, dtype)
            gate.timings[key] = {}
            for tokens in token_counts:
                per = gate.timings[key].setdefault(int(tokens), {})
                for density in densities:
                    x = random_sparse_input(int(tokens), in_f, 1 - density, g, shared=False).to(dtype)
                    dense, sparse = [], []
                    for _ in range(3):  # alternate: noise from other processes lands on both
                        dense.append(median_seconds(lambda: F.linear(x, w), repeats, warmup))
                        sparse.append(median_seconds(lambda: kernel.product(x, wt, 0.0), repeats, warmup))
                    per[round(density_bucket(density), 2)] = {"dense_s": sorted(dense)[1], "sparse_s": sorted(sparse)[1]}
        return gate


def random_sparse_input(tokens: int, in_f: int, sparsity: float, generator: torch.Generator, shared: bool = True) -> torch.Tensor:
    """Random float32 x [tokens, in] with round(sparsity * in) channels exactly zero; `shared`: the same zeroed channels
    for every token (the kernel's best case at tokens > 1), else independently per token (its worst)."""
    x = torch.randn(tokens, in_f, generator=generator)
    n_zero = round(sparsity * in_f)
    if shared:
        x[:, torch.randperm(in_f, generator=generator)[:n_zero]] = 0.0
    else:
        for t in range(tokens):
            x[t, torch.randperm(in_f, generator=generator)[:n_zero]] = 0.0
    return x
