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
- `row_skip_int8_product` skips rows of issue 11's int8 per-channel codes (`Int8Rows`: input-major, scale applied
  once at the end); `gated_mlp_product` is CATS's gated MLP with the up product's rows gathered and the down
  product's rows skipped, one call. Both C++ only, each with its reference (`reference_int8_product`,
  `reference_gated_mlp`).
- `ActivationGate` keys timings by shape, dtype, token count and density bucket, measured on this machine; a call
  takes the fastest measured path (sparse, or int8 dense / down-only where those were timed) that beat the dense
  product, else dense. The CUDA kernel is `activation_sparse_triton.py`, registered here as `triton`.
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
#if defined(__AVX512F__)
// int8 codes (weight-only storage), widened to float32; the per-output scale is applied once, after the sum.
static inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif
static inline float load1(const float* p) { return *p; }
static inline float load1(const uint16_t* p) { return bf16_to_float(*p); }
static inline float load1(const int8_t* p) { return static_cast<float>(*p); }

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

// The fused threshold: channel j is active when |x[t, j]| > thr[j] for some token t. Fills `rows` with the active
// channels and `vals` [rows, T] with x where kept, 0 where masked out; returns the kept entries.
static int64_t select_rows(const float* xp, const float* tp, int64_t T, int64_t in, std::vector<int64_t>& rows,
                           std::vector<float>& vals) {
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
  return kept;
}

static void check_common(const torch::Tensor& x, const torch::Tensor& thr, int64_t in, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in, name, ": shapes do not match");
  TORCH_CHECK(thr.scalar_type() == torch::kFloat32 && thr.numel() == in, name, ": thr must be float32 [in]");
}

template <typename F>
static void by_dtype(const torch::Tensor& w, F&& f) {
  if (w.scalar_type() == torch::kFloat32) f(w.data_ptr<float>());
  else if (w.scalar_type() == torch::kBFloat16) f(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()));
  else TORCH_CHECK(false, "weights must be float32 or bfloat16");
}

// x [T, in] (float32 or bfloat16), wt [in, out] (same dtype, contiguous), thr [in] float32.
// Masked-out entries of active rows are zero.
std::vector<torch::Tensor> row_skip(torch::Tensor x, torch::Tensor wt, torch::Tensor thr) {
  TORCH_CHECK(wt.dim() == 2, "row_skip: weight must be 2-D");
  check_common(x, thr, wt.size(0), "row_skip");
  auto xf = x.to(torch::kFloat32).contiguous();
  auto th = thr.contiguous();
  wt = wt.contiguous();
  const int64_t T = xf.size(0), in = xf.size(1), out = wt.size(1);
  std::vector<int64_t> rows;
  std::vector<float> vals;
  const int64_t kept = select_rows(xf.data_ptr<float>(), th.data_ptr<float>(), T, in, rows, vals);
  auto y = torch::zeros({T, out}, xf.options());
  float* yp = y.data_ptr<float>();
  by_dtype(wt, [&](auto* w) { accumulate(w, rows, vals, yp, T, out); });
  auto counts = torch::tensor({static_cast<int64_t>(rows.size()), kept}, torch::kInt64);
  return {y.to(x.scalar_type()), counts};
}

// The same over int8 weight-only storage: ct [in, out] int8 (signed codes, input-major), scale [out] float32 and,
// for asymmetric codes, offset [out] float32 (w[o, j] = scale[o] * ct[j, o] + offset[o]; empty tensor when 0).
// Rows are summed as integers widened to float32; y = scale * sum + offset * (sum of the kept x), once per output.
std::vector<torch::Tensor> row_skip_int8(torch::Tensor x, torch::Tensor ct, torch::Tensor thr, torch::Tensor scale,
                                         torch::Tensor offset) {
  TORCH_CHECK(ct.dim() == 2 && ct.scalar_type() == torch::kInt8, "row_skip_int8: codes must be int8 [in, out]");
  check_common(x, thr, ct.size(0), "row_skip_int8");
  const int64_t out = ct.size(1);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.numel() == out, "row_skip_int8: scale must be float32 [out]");
  const bool has_offset = offset.numel() > 0;
  TORCH_CHECK(!has_offset || (offset.scalar_type() == torch::kFloat32 && offset.numel() == out),
              "row_skip_int8: offset must be float32 [out] or empty");
  auto xf = x.to(torch::kFloat32).contiguous();
  auto th = thr.contiguous();
  ct = ct.contiguous();
  auto sc = scale.contiguous();
  auto of = offset.contiguous();
  const int64_t T = xf.size(0), in = xf.size(1);
  std::vector<int64_t> rows;
  std::vector<float> vals;
  const int64_t kept = select_rows(xf.data_ptr<float>(), th.data_ptr<float>(), T, in, rows, vals);
  auto y = torch::zeros({T, out}, xf.options());
  float* yp = y.data_ptr<float>();
  accumulate(ct.data_ptr<int8_t>(), rows, vals, yp, T, out);
  const float* sp = sc.data_ptr<float>();
  const float* op = has_offset ? of.data_ptr<float>() : nullptr;
  for (int64_t t = 0; t < T; ++t) {
    float total = 0.0f;
    if (op)
      for (size_t k = 0; k < rows.size(); ++k) total += vals[k * T + t];
    float* yt = yp + t * out;
    for (int64_t o = 0; o < out; ++o) yt[o] = yt[o] * sp[o] + (op ? op[o] * total : 0.0f);
  }
  auto counts = torch::tensor({static_cast<int64_t>(rows.size()), kept}, torch::kInt64);
  return {y.to(x.scalar_type()), counts};
}

// dot(r, x[t]) for each of T tokens (x float32 [T, n]); `next` (or null) is the row after r, prefetched a cache line
// at a time so the scattered active rows do not each start with a stall.
template <typename W>
static inline void dots(const W* __restrict__ r, const float* __restrict__ x, int64_t T, int64_t n, float* out, const W* next) {
  constexpr int64_t LINE = 64 / sizeof(W);
  for (int64_t t0 = 0; t0 < T; t0 += 8) {
    const int64_t tb = std::min<int64_t>(8, T - t0);
    int64_t o = 0;
#if defined(__AVX512F__)
    __m512 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
    for (; o + 16 <= n; o += 16) {
      if (next && t0 == 0 && (o % LINE) == 0) __builtin_prefetch(next + o, 0, 1);
      const __m512 w = load16(r + o);
      for (int64_t i = 0; i < tb; ++i) acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + (t0 + i) * n + o), acc[i]);
    }
    for (int64_t i = 0; i < tb; ++i) out[t0 + i] = _mm512_reduce_add_ps(acc[i]);
#else
    for (int64_t i = 0; i < tb; ++i) out[t0 + i] = 0.0f;
#endif
    for (; o < n; ++o)
      for (int64_t i = 0; i < tb; ++i) out[t0 + i] += load1(r + o) * x[(t0 + i) * n + o];
  }
}

// CATS's gated MLP after the activation: a = act(gate(x)) [T, inter] is thresholded (|a| > thr, fused); for the
// active channels i only, u_i = w_up[i, :] . x (rows of the up weight [inter, hidden] are contiguous: an output-row
// gather) and h_i = a_i * u_i; then y = h times the down weight, skipping inactive rows of its input-major copy
// wt_down [inter, hidden]. The up and down products each read only the active rows.
std::vector<torch::Tensor> gated_mlp(torch::Tensor a, torch::Tensor x, torch::Tensor w_up, torch::Tensor wt_down, torch::Tensor thr) {
  TORCH_CHECK(w_up.dim() == 2 && wt_down.dim() == 2 && w_up.sizes() == wt_down.sizes(), "gated_mlp: up [inter, hidden] and down^T [inter, hidden] differ");
  TORCH_CHECK(w_up.scalar_type() == wt_down.scalar_type(), "gated_mlp: up and down weights must share a dtype");
  const int64_t inter = w_up.size(0), hidden = w_up.size(1);
  check_common(a, thr, inter, "gated_mlp");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == a.size(0) && x.size(1) == hidden, "gated_mlp: x must be [tokens, hidden]");
  TORCH_CHECK(a.size(0) <= 64, "gated_mlp: at most 64 tokens per call");
  auto af = a.to(torch::kFloat32).contiguous();
  auto xf = x.to(torch::kFloat32).contiguous();
  auto th = thr.contiguous();
  w_up = w_up.contiguous();
  wt_down = wt_down.contiguous();
  const int64_t T = af.size(0);
  std::vector<int64_t> rows;
  std::vector<float> vals;
  const int64_t kept = select_rows(af.data_ptr<float>(), th.data_ptr<float>(), T, inter, rows, vals);
  const int64_t n = static_cast<int64_t>(rows.size());
  const float* xp = xf.data_ptr<float>();
  by_dtype(w_up, [&](auto* up) {
    at::parallel_for(0, n, 16, [&](int64_t k0, int64_t k1) {
      float u[64];
      for (int64_t k = k0; k < k1; ++k) {
        const auto* next = k + 1 < k1 ? up + rows[k + 1] * hidden : nullptr;
        dots(up + rows[k] * hidden, xp, T, hidden, u, next);
        for (int64_t t = 0; t < T; ++t) vals[k * T + t] *= u[t];
      }
    });
  });
  auto y = torch::zeros({T, hidden}, xf.options());
  float* yp = y.data_ptr<float>();
  by_dtype(wt_down, [&](auto* w) { accumulate(w, rows, vals, yp, T, hidden); });
  auto counts = torch::tensor({n, kept}, torch::kInt64);
  return {y.to(x.scalar_type()), counts};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("row_skip", &row_skip, "row-skipping activation-sparse product");
  m.def("row_skip_int8", &row_skip_int8, "row-skipping product over int8 weight-only codes");
  m.def("gated_mlp", &gated_mlp, "CATS gated MLP: up rows gathered, down rows skipped");
}
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
                _module = cpp_extension.load_inline(f"sparseforge_row_skip_v6_{_cpu_tag()}", cpp_sources=_SOURCE, extra_cflags=flags,
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
    module = _module_or_raise()
    t = _as_vector(threshold, weight_t.shape[0], x.device)
    y, counts = module.row_skip(x, weight_t, t)
    return y, int(counts[0]), int(counts[1])


def _module_or_raise():
    module = _build()
    if module is None:
        raise RuntimeError("the row-skipping kernel is not available; use the reference product")
    return module


# ---- over int8 weight-only storage ---------------------------------------------------------------------------
@dataclasses.dataclass
class Int8Rows:
    """Issue 11's int8 per-output-channel codes laid out for row skipping: `codes_t` [in, out] int8 (signed, the
    transposed codes minus 128, input-major so an input channel is one contiguous row of `out` bytes), `scale` [out]
    float32 and `offset` [out] float32 (None for symmetric codes): w[o, j] = scale[o] * codes_t[j, o] + offset[o].
    From GPTQ/RTN's w = s (q - z) = s (q - 128) + s (128 - z), so the reconstruction is the recorded one."""

    codes_t: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None

    @classmethod
    def accepts(cls, qw) -> bool:
        return qw.scheme.bits == 8 and qw.scheme.group_size in (0, qw.shape[1]) and qw.outliers is None

    @classmethod
    def from_quantized(cls, qw) -> "Int8Rows":
        if not cls.accepts(qw):
            raise UserInputError(f"row skipping over integer codes needs 8-bit per-channel codes without outliers, not {qw.scheme}")
        signed = (qw.codes.to(torch.int16) - 128).to(torch.int8)
        scale = qw.scale[:, 0].float()
        offset = (128 - qw.zero[:, 0].float()) * scale
        return cls(signed.t().contiguous(), scale.contiguous(), offset.contiguous() if bool((offset != 0).any()) else None)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] these codes stand for."""
        w = self.codes_t.t().float() * self.scale[:, None]
        return w if self.offset is None else w + self.offset[:, None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes_t, self.scale, self.offset) if t is not None)


def int8_dense_ok(in_features: int) -> bool:
    """Whether issue 11's int8 dense operator (`torch._weight_int8pack_mm`) may serve as the int8 fallback: in torch
    2.13's CPU build it returns wrong sums for some input sizes that are not a multiple of 16 (e.g. 24, 40, 203;
    tests/test_activation_fused.py), so those projections fall back to the float product instead."""
    return in_features % 16 == 0


def reference_int8_product(x: torch.Tensor, rows: Int8Rows, threshold) -> torch.Tensor:
    """Mask, then the dense product with the dequantized weight (float32 accumulation, returned in x's dtype)."""
    w = rows.dequantize()
    return reference_product(x.float(), w, threshold).to(x.dtype)


def row_skip_int8_product(x: torch.Tensor, rows: Int8Rows, threshold) -> tuple[torch.Tensor, int, int]:
    """The row-skipping product over int8 codes: reads only the active input channels' rows of `codes_t` (one byte per
    weight), sums them in float32 and applies the per-output scale (and offset) once at the end. Returns (y, rows
    read, entries kept)."""
    module = _module_or_raise()
    t = _as_vector(threshold, rows.codes_t.shape[0], x.device)
    empty = torch.empty(0, dtype=torch.float32)
    y, counts = module.row_skip_int8(x, rows.codes_t, t, rows.scale, rows.offset if rows.offset is not None else empty)
    return y, int(counts[0]), int(counts[1])


# ---- CATS's gated MLP: the up product's rows gathered, the down product's rows skipped --------------------------
def reference_gated_mlp(a: torch.Tensor, x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, threshold) -> torch.Tensor:
    """The definition: zero a = act(gate(x)) where |a| <= threshold, then down((a) * up(x)), without biases."""
    t = _as_vector(threshold, w_up.shape[0], a.device)
    keep = a.abs() > (t.to(a.dtype) if a.dtype != torch.float32 else t)
    return F.linear((a * keep) * F.linear(x, w_up), w_down)


def gated_mlp_product(a: torch.Tensor, x: torch.Tensor, w_up: torch.Tensor, wt_down: torch.Tensor, threshold) -> tuple[torch.Tensor, int, int]:
    """`reference_gated_mlp` computing only what the zeros leave: for the channels i kept by some token, the up
    weight's row i (its output i; rows of [inter, hidden] are contiguous) dotted with x, times a, then the down
    product over the same rows of its input-major copy `wt_down` [inter, hidden]. Returns (y [tokens, hidden], rows
    read per weight, entries kept); at most 64 tokens."""
    module = _module_or_raise()
    t = _as_vector(threshold, w_up.shape[0], a.device)
    y, counts = module.gated_mlp(a, x, w_up, wt_down, t)
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
class Auto(ActivationKernel):
    name = "auto"
    summary = "the first registered kernel that runs on the weight's device and dtype (row-skip on CPU, triton on CUDA)"

    def __init__(self):
        self._picked: dict[tuple[str, torch.dtype], ActivationKernel | None] = {}

    def pick(self, device, dtype) -> ActivationKernel | None:
        key = (torch.device(device).type, dtype)
        if key not in self._picked:
            self._picked[key] = next((k for k in ACTIVATION_KERNELS.values() if k is not self and k.supports(device, dtype)), None)
        return self._picked[key]

    def supports(self, device, dtype) -> bool:
        return self.pick(device, dtype) is not None

    def product(self, x, weight_t, threshold):
        return self.pick(weight_t.device, weight_t.dtype).product(x, weight_t, threshold)


@register_activation_kernel
class RowSkip(ActivationKernel):
    name = "row-skip"
    summary = "C++ row-skipping product on CPU, float32 and bfloat16 (built on first use); also over int8 codes and CATS's gated MLP"

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


def cpu_extras_supported(kernel: ActivationKernel, device, dtype) -> bool:
    """Whether the int8 and gated-MLP products (C++ only) can serve a stage that asked for `kernel`."""
    return kernel.name in ("auto", "row-skip") and supports(device, dtype)


def density_bucket(density: float) -> float:
    """Density rounded up to DENSITY_STEP (0.43 -> 0.5): the timing a call of that density may rely on."""
    return min(1.0, math.ceil(density / DENSITY_STEP - 1e-9) * DENSITY_STEP)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def gate_key(out_f: int, in_f: int, dtype: torch.dtype, device="cpu") -> str:
    """"OUTxIN@dtype" on CPU; other devices append "@type", so timings from one never steer the other."""
    kind = torch.device(device).type
    return f"{out_f}x{in_f}@{_dtype_name(dtype)}" + ("" if kind == "cpu" else f"@{kind}")


def int8_gate_key(out_f: int, in_f: int, dtype: torch.dtype) -> str:
    """A projection stored as int8 codes, activations in `dtype` (CPU)."""
    return f"{out_f}x{in_f}@w8-{_dtype_name(dtype)}"


def mlp_gate_key(inter: int, hidden: int, dtype: torch.dtype) -> str:
    """A gated MLP of `inter` channels over `hidden` (CATS's fused up + down product, CPU)."""
    return f"mlp{inter}x{hidden}@{_dtype_name(dtype)}"


@dataclasses.dataclass
class ActivationGate:
    """Which product to run per (shape and dtype key, tokens, density bucket), from timings on this machine.

    `timings[key][tokens][bucket] = {"dense_s": ..., "sparse_s": ..., maybe others "<path>_s"}`: seconds per call of
    each path (dense: mask then `F.linear`; sparse: the row-skipping kernel; int8: the int8 weight-only dense kernel;
    down: CATS's MLP with only the down product skipping). A call uses the smallest measured token count at least as
    large as its own (never one smaller: no extrapolation) and the smallest measured density at least as large as
    its own (else dense); it takes the fastest path that beat dense by more than `margin`, else dense."""

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
        limit = (1 - self.margin) * t["dense_s"]
        faster = [(v, k[:-2]) for k, v in t.items() if k != "dense_s" and v < limit]
        return min(faster)[1] if faster else "dense"

    def max_density(self, key: str, tokens: int) -> float:
        """The largest measured density at which the sparse path still wins for `tokens` (0 if none): a call whose
        density is known to be above it goes dense without running the kernel's gather."""
        per_tokens = self.timings.get(key) or {}
        counts = sorted(per_tokens)
        bucket_tokens = min((t for t in counts if t >= tokens), default=None)
        if bucket_tokens is None:
            return 0.0
        # Only the prefix of densities where sparse wins at every step counts (timings are noisy).
        best = 0.0
        for d in sorted(per_tokens[bucket_tokens]):
            if self.choose(key, bucket_tokens, d) != "sparse":
                break
            best = d
        return best

    def to_dict(self) -> dict:
        return {"margin": self.margin,
                "timings": {k: {str(t): {f"{d:.2f}": v for d, v in per.items()} for t, per in pt.items()} for k, pt in self.timings.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "ActivationGate":
        def entry(v: dict) -> dict[str, float]:
            if "dense_s" not in v or "sparse_s" not in v:
                raise KeyError("dense_s/sparse_s")
            return {str(k): float(x) for k, x in v.items() if str(k).endswith("_s")}

        try:
            timings = {k: {int(t): {float(d): entry(v) for d, v in per.items()} for t, per in pt.items()} for k, pt in data["timings"].items()}
            return cls(timings, float(data.get("margin", 0.05)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserInputError(f"activation speed gate data is malformed ({exc!r}); re-create the artifact") from None

    def merge(self, other: "ActivationGate") -> "ActivationGate":
        self.timings.update(other.timings)
        return self

    @classmethod
    def measure(cls, shapes, dtype=torch.float32, token_counts=(1, 2, 4, 8), densities=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                repeats: int = 7, warmup: int = 2, margin: float = 0.05, kernel: "ActivationKernel | str" = "row-skip",
                device="cpu") -> "ActivationGate":
        """Time dense `F.linear` and the row-skipping product on random weights of each (out, in) shape, on inputs
        whose channels are active at each density, each token its own channels (the worst case for several tokens: a
        row is read when any token keeps it), alternating the two so load on the machine hits both alike. Empty gate
        when the kernel cannot run on `device` in `dtype`."""
        gate = cls(margin=margin)
        kernel = get_activation_kernel(kernel) if isinstance(kernel, str) else kernel
        if not kernel.supports(device, dtype):
            return gate
        g = torch.Generator().manual_seed(0)
        for out_f, in_f in dict.fromkeys((int(o), int(i)) for o, i in shapes):
            w = torch.randn(out_f, in_f, generator=g).to(device, dtype)
            wt = w.t().contiguous()
            per_key = gate.timings.setdefault(gate_key(out_f, in_f, dtype, device), {})
            for tokens in token_counts:
                for density in densities:
                    x = random_sparse_input(int(tokens), in_f, 1 - density, g, shared=False).to(device, dtype)
                    per_key.setdefault(int(tokens), {})[round(density_bucket(density), 2)] = time_paths(
                        {"dense": lambda: F.linear(x, w), "sparse": lambda: kernel.product(x, wt, 0.0)}, repeats, warmup, device)
        return gate

    @classmethod
    def measure_int8(cls, shapes, dtype=torch.bfloat16, token_counts=(1, 2, 4, 8), densities=(0.5,), repeats: int = 7, warmup: int = 2,
                     margin: float = 0.05) -> "ActivationGate":
        """For projections stored as int8 per-channel codes: time dense `F.linear` in `dtype`, the int8 weight-only
        dense kernel (issue 11's, on the masked input) and row skipping over the int8 codes. Empty when the C++
        kernel cannot run."""
        from sparseforge.core.quantizer import QuantScheme, quantize_rtn
        from sparseforge.kernels.int_weight_only import Int8WeightOnly

        gate = cls(margin=margin)
        if not supports("cpu", dtype):
            return gate
        g = torch.Generator().manual_seed(0)
        dense_int8 = Int8WeightOnly()
        for out_f, in_f in dict.fromkeys((int(o), int(i)) for o, i in shapes):
            qw = quantize_rtn(torch.randn(out_f, in_f, generator=g) * 0.02, QuantScheme(8, True, 0))
            w, packed, rows = qw.dequantize().to(dtype), dense_int8.pack(qw), Int8Rows.from_quantized(qw)
            per_key = gate.timings.setdefault(int8_gate_key(out_f, in_f, dtype), {})
            for tokens in token_counts:
                for density in densities:
                    x = random_sparse_input(int(tokens), in_f, 1 - density, g, shared=False).to(dtype)
                    paths = {"dense": lambda: F.linear(x, w), "sparse": lambda: row_skip_int8_product(x, rows, 0.0)}
                    if int8_dense_ok(in_f):
                        paths["int8"] = lambda: dense_int8.matmul(x, packed)
                    per_key.setdefault(int(tokens), {})[round(density_bucket(density), 2)] = time_paths(paths, repeats, warmup)
        return gate

    @classmethod
    def measure_gated_mlp(cls, shapes, dtype=torch.float32, token_counts=(1, 2, 4, 8), densities=(0.5,), repeats: int = 7, warmup: int = 2,
                          margin: float = 0.05) -> "ActivationGate":
        """For CATS's gated MLPs of (inter, hidden): time the up and down products dense ("dense"), up dense and down
        row-skipping ("down", the unfused CATS path) and the fused kernel (up rows gathered, down rows skipped)."""
        gate = cls(margin=margin)
        if not supports("cpu", dtype):
            return gate
        g = torch.Generator().manual_seed(0)
        for inter, hidden in dict.fromkeys((int(a), int(b)) for a, b in shapes):
            w_up = torch.randn(inter, hidden, generator=g).to(dtype)
            w_down = torch.randn(hidden, inter, generator=g).to(dtype)
            wt_down = w_down.t().contiguous()
            per_key = gate.timings.setdefault(mlp_gate_key(inter, hidden, dtype), {})
            for tokens in token_counts:
                for density in densities:
                    a = random_sparse_input(int(tokens), inter, 1 - density, g, shared=False).to(dtype)
                    x = torch.randn(int(tokens), hidden, generator=g).to(dtype)
                    per_key.setdefault(int(tokens), {})[round(density_bucket(density), 2)] = time_paths(
                        {"dense": lambda: F.linear(a * F.linear(x, w_up), w_down),
                         "down": lambda: row_skip_product(a * F.linear(x, w_up), wt_down, 0.0),
                         "sparse": lambda: gated_mlp_product(a, x, w_up, wt_down, 0.0)}, repeats, warmup)
        return gate


def time_paths(fns: dict, repeats: int, warmup: int, device="cpu") -> dict[str, float]:
    """{"<path>_s": seconds} per path: three alternating rounds of medians (noise from other processes lands on every
    path alike), the middle one kept."""
    rounds: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(3):
        for k, fn in fns.items():
            rounds[k].append(median_seconds(fn, repeats, warmup, device))
    return {f"{k}_s": sorted(v)[1] for k, v in rounds.items()}


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


from sparseforge.kernels import activation_sparse_triton  # noqa: E402,F401  (registers the GPU kernel; imports triton lazily)
