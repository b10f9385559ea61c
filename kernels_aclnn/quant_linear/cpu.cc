// Linear layers over weights kept quantized (weight-only: W8A16 / W4A16 / ternary W2A16): the
// codes are unpacked and dequantized in registers, inside the GEMV (decode) and GEMM (prefill).
//   x: [M, K] fp32   y: fp32
//   packed  [N, K * bits / 8] uint8   bits 8, 4 or 2, from the row width; codes c are unsigned
//   scales  [N, K / G] fp32 | fp16 | bf16   one per group of G consecutive inputs (G = K: per channel)
//   offsets [N, K / G] the scales' dtype: w = s * c + m (asymmetric, GGUF Q4_1),
//           or [1] (any dtype): w = s * (c - 2^(bits-1)) (symmetric, GGUF Q8_0 / Q4_0, ternary)
// Code layouts along a row (the 4-bit one is GGUF's Q4_0/Q4_1 block, so those keep their bytes):
//   8-bit  byte k = c[k]
//   4-bit  per 32 inputs, 16 bytes: byte j = c[j] | c[j + 16] << 4
//   2-bit  per 32 inputs, 8 bytes:  byte j = c[j] | c[j + 8] << 2 | c[j + 16] << 4 | c[j + 24] << 6
// 4- and 2-bit groups are multiples of 32 inputs; 8-bit groups any length.
// Entry points (MindSpore AOT signature, inputs then output):
//   QuantLinear(x, packed, scales, offsets, y)                   y = x W^T                 [M, N]
//   QuantLinearSwiglu(x, packed, scales, offsets, y)             W = gate|up (2I rows)     [M, I]
//   QuantLinearResidual(x, packed, scales, offsets, r, scale, y) y = r + scale[0] x W^T    [M, N]
// The instruction set is chosen at run time: AVX-512F, else AVX2+FMA, else scalar; the
// environment variable MINDCPM_QUANT_ISA=scalar|avx2|avx512 (or QuantLinearSetIsa) picks a
// narrower one. No VNNI/AMX path: those multiply integer or bf16 activations, and these stay fp32.
#include "../common/gemv.h"

#include <immintrin.h>

#include <type_traits>

using namespace mindcpm;

namespace {

// Code of input k of a packed row (the layouts above).
template <int Bits>
inline unsigned code(const uint8_t *row, int64_t k) {
  if (Bits == 8) return row[k];
  if (Bits == 4) {
    const uint8_t b = row[(k >> 5) * 16 + (k & 15)];
    return (k & 16) ? b >> 4 : b & 15;
  }
  return (row[(k >> 5) * 8 + (k & 7)] >> (2 * ((k >> 3) & 3))) & 3;
}

// One quantized weight: row r's codes, group g's scale and the bias b with w = s * c + b.
template <class S>
struct QWeight {
  const uint8_t *packed;
  const typename S::T *scales, *offsets;  // offsets null: symmetric around `center`
  int64_t K, G, groups, row_bytes;
  float center;
  const uint8_t *codes(int64_t r) const { return packed + r * row_bytes; }
  float scale(int64_t r, int64_t g) const { return S::get(scales + r * groups + g); }
  float bias(int64_t r, int64_t g, float s) const { return offsets ? S::get(offsets + r * groups + g) : -center * s; }
};

// The arguments of an entry point, checked: which one is wrong is the error code.
struct Problem {
  const float *x;
  const void *packed, *scales, *offsets;
  const char *scale_dtype;
  int64_t M, K, N, bits, G;
  bool symmetric;
};

enum Error { kOk = 0, kBadX = 10, kBadPacked = 11, kBadScales = 12, kBadOffsets = 13, kBadOther = 14 };

int parse(void **params, int *ndims, int64_t **shapes, const char **dtypes, Problem *p) {
  if (std::strcmp(dtypes[0], "float32") != 0 || ndims[0] < 1) return kBadX;
  p->K = shapes[0][ndims[0] - 1];
  p->M = numel(ndims[0], shapes[0]) / std::max<int64_t>(p->K, 1);
  if (std::strcmp(dtypes[1], "uint8") != 0 || ndims[1] != 2 || p->K <= 0) return kBadPacked;
  p->N = shapes[1][0];
  const int64_t width = shapes[1][1];
  p->bits = width * 8 % p->K == 0 ? width * 8 / p->K : 0;
  if (p->bits != 8 && p->bits != 4 && p->bits != 2) return kBadPacked;
  if (p->bits < 8 && p->K % 32 != 0) return kBadPacked;
  p->scale_dtype = dtypes[2];
  if (weight_type(dtypes[2]) == WType::kOther || ndims[2] != 2 || shapes[2][0] != p->N || shapes[2][1] <= 0 ||
      p->K % shapes[2][1] != 0)
    return kBadScales;
  p->G = p->K / shapes[2][1];
  if (p->bits < 8 && p->G % 32 != 0) return kBadScales;
  p->symmetric = ndims[3] == 1 && shapes[3][0] == 1;  // offsets [1]: none
  if (!p->symmetric && (std::strcmp(dtypes[3], dtypes[2]) != 0 || ndims[3] != 2 || shapes[3][0] != p->N ||
                        shapes[3][1] != shapes[2][1]))
    return kBadOffsets;
  p->x = static_cast<const float *>(params[0]);
  p->packed = params[1], p->scales = params[2], p->offsets = p->symmetric ? nullptr : params[3];
  return kOk;
}

template <class S>
QWeight<S> weight_of(const Problem &p) {
  return {static_cast<const uint8_t *>(p.packed), static_cast<const typename S::T *>(p.scales),
          static_cast<const typename S::T *>(p.offsets), p.K, p.G, p.K / p.G, p.K * p.bits / 8,
          float(1 << (p.bits - 1))};
}

// Per row of x, the sum of its inputs over each group (the bias term's factor).
const float *group_sums(const Problem &p) {
  thread_local std::vector<float> sums;
  const int64_t groups = p.K / p.G;
  sums.resize(p.M * groups);
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t k = g * p.G; k < (g + 1) * p.G; ++k) s += p.x[m * p.K + k];
      sums[m * groups + g] = s;
    }
  return sums.data();
}

template <class T>
struct Type { using type = T; };

// run(bits, scale type, x, xsum, weight, M, units, epilogue) for the problem's format.
template <class E, class Run>
int dispatch_formats(const Problem &p, const E &epi, Run run) {
  const float *xsum = group_sums(p);
  const int64_t units = p.N / E::kRowsPerUnit;
  mindcpm_prefer_huge_pages(p.packed, p.N * p.K * p.bits / 8);
  auto with_scales = [&](auto bits) -> int {
    switch (weight_type(p.scale_dtype)) {
      case WType::kF32: run(bits, Type<F32>(), p.x, xsum, weight_of<F32>(p), p.M, units, epi); return kOk;
      case WType::kBF16: run(bits, Type<BF16>(), p.x, xsum, weight_of<BF16>(p), p.M, units, epi); return kOk;
      case WType::kF16: run(bits, Type<F16>(), p.x, xsum, weight_of<F16>(p), p.M, units, epi); return kOk;
      default: return kBadScales;
    }
  };
  switch (p.bits) {
    case 8: return with_scales(std::integral_constant<int, 8>());
    case 4: return with_scales(std::integral_constant<int, 4>());
    case 2: return with_scales(std::integral_constant<int, 2>());
    default: return kBadPacked;
  }
}

}  // namespace

// -- the paths, one per instruction set, from the same source ---------------------------------------
namespace scalar_isa {
struct V {
  using F = float;
  static constexpr int L = 1;
  static F zero() { return 0.f; }
  static F set1(float v) { return v; }
  static F load(const float *p) { return *p; }
  static F fmadd(F a, F b, F c) { return a * b + c; }
  static float hsum(F v) { return v; }
  template <int Bits> static F codes(const uint8_t *row, int64_t k) { return (float)code<Bits>(row, k); }
};
#include "../common/quant_gemv.inc"
}  // namespace scalar_isa

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2_isa {
struct V {
  using F = __m256;
  static constexpr int L = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float *p) { return _mm256_loadu_ps(p); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static __m128i load8(const uint8_t *p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i *>(p)); }
  // k is a multiple of 8: 8-bit reads 8 bytes; 4-bit the low or high nibbles of 8 bytes of the
  // block; 2-bit one of the 4 bit pairs of the block's 8 bytes.
  template <int Bits> static F codes(const uint8_t *row, int64_t k) {
    __m128i v;
    if (Bits == 8) {
      v = load8(row + k);
    } else if (Bits == 4) {
      v = load8(row + (k >> 5) * 16 + (k & 15));
      if (k & 16) v = _mm_srli_epi16(v, 4);
      v = _mm_and_si128(v, _mm_set1_epi8(15));
    } else {
      v = _mm_srl_epi64(load8(row + (k >> 5) * 8), _mm_cvtsi32_si128(int(2 * ((k >> 3) & 3))));
      v = _mm_and_si128(v, _mm_set1_epi8(3));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
  }
};
#include "../common/quant_gemv.inc"
}  // namespace avx2_isa
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
namespace avx512_isa {
struct V {
  using F = __m512;
  static constexpr int L = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float *p) { return _mm512_loadu_ps(p); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  static __m128i load8(const uint8_t *p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i *>(p)); }
  // k is a multiple of 16: 8-bit reads 16 bytes; 4-bit the low or high nibbles of the block's
  // 16 bytes; 2-bit two neighbouring bit pairs of the block's 8 bytes.
  template <int Bits> static F codes(const uint8_t *row, int64_t k) {
    __m128i v;
    if (Bits == 8) {
      v = _mm_loadu_si128(reinterpret_cast<const __m128i *>(row + k));
    } else if (Bits == 4) {
      v = _mm_loadu_si128(reinterpret_cast<const __m128i *>(row + (k >> 5) * 16));
      if (k & 16) v = _mm_srli_epi16(v, 4);
      v = _mm_and_si128(v, _mm_set1_epi8(15));
    } else {
      const __m128i b = load8(row + (k >> 5) * 8);
      const int shift = int(2 * ((k >> 3) & 3));
      v = _mm_unpacklo_epi64(_mm_srl_epi64(b, _mm_cvtsi32_si128(shift)), _mm_srl_epi64(b, _mm_cvtsi32_si128(shift + 2)));
      v = _mm_and_si128(v, _mm_set1_epi8(3));
    }
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
  }
};
#include "../common/quant_gemv.inc"
}  // namespace avx512_isa
#pragma GCC pop_options

namespace {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
const char *const kIsaNames[] = {"scalar", "avx2", "avx512"};

Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
  return Isa::kScalar;
}

// The ISA named `name` if this CPU has it, else -1.
int isa_named(const char *name) {
  for (int i = 0; i < 3; ++i)
    if (std::strcmp(name, kIsaNames[i]) == 0) return i <= (int)best_isa() ? i : -1;
  return -1;
}

std::atomic<int> &chosen_isa() {
  static std::atomic<int> isa([] {
    const char *env = std::getenv("MINDCPM_QUANT_ISA");
    const int named = env && *env && std::strcmp(env, "auto") != 0 ? isa_named(env) : -1;
    return named >= 0 ? named : (int)best_isa();
  }());
  return isa;
}

template <class E>
int run_problem(void **params, int *ndims, int64_t **shapes, const char **dtypes, int out, E epi_of) {
  Problem p;
  if (int err = parse(params, ndims, shapes, dtypes, &p)) return err;
  const auto epi = epi_of(static_cast<float *>(params[out]), p);
  if (numel(ndims[out], shapes[out]) != p.M * (p.N / decltype(epi)::kRowsPerUnit)) return kBadOther;
  switch ((Isa)chosen_isa().load(std::memory_order_relaxed)) {
    case Isa::kAvx512: return avx512_isa::dispatch(p, epi);
    case Isa::kAvx2: return avx2_isa::dispatch(p, epi);
    default: return scalar_isa::dispatch(p, epi);
  }
}

}  // namespace

// The instruction set in use ("scalar" | "avx2" | "avx512").
extern "C" const char *QuantLinearIsa() { return kIsaNames[chosen_isa().load()]; }

// Uses instruction set `name` from now on ("auto": the best this CPU has); 0 on success,
// 1 when the name is unknown or this CPU lacks it.
extern "C" int QuantLinearSetIsa(const char *name) {
  const int isa = std::strcmp(name, "auto") == 0 ? (int)best_isa() : isa_named(name);
  if (isa < 0) return 1;
  chosen_isa().store(isa);
  return 0;
}

extern "C" int QuantLinear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                           void *) {
  if (nparam != 5) return 1;
  return run_problem(params, ndims, shapes, dtypes, 4, [](float *y, const Problem &p) { return gemv::Plain{y, p.N}; });
}

extern "C" int QuantLinearSwiglu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *, void *) {
  if (nparam != 5) return 1;
  return run_problem(params, ndims, shapes, dtypes, 4,
                     [](float *y, const Problem &p) { return gemv::Swiglu{y, p.N / 2}; });
}

extern "C" int QuantLinearResidual(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *, void *) {
  if (nparam != 7 || std::strcmp(dtypes[4], "float32") != 0 || std::strcmp(dtypes[5], "float32") != 0)
    return kBadOther;
  if (numel(ndims[4], shapes[4]) != numel(ndims[6], shapes[6])) return kBadOther;
  const auto *r = static_cast<const float *>(params[4]);
  const float scale = *static_cast<const float *>(params[5]);
  return run_problem(params, ndims, shapes, dtypes, 6,
                     [&](float *y, const Problem &p) { return gemv::Residual{y, p.N, r, scale}; });
}
