// Shared helpers of the CPU kernels: 16-bit weight loads widened to fp32, horizontal sums,
// and the thread count. Each kernel's cpu.cc includes this header by relative path.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace mindcpm {

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise the mantissa
    int e = -1;
    do { ++e; man <<= 1; } while ((man & 0x400) == 0);
    u = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Weight element types: T is the stored type; get() widens one element, load8() eight.
struct F32 {
  using T = float;
  static float get(const T *p) { return *p; }
#ifdef __AVX2__
  static __m256 load8(const T *p) { return _mm256_loadu_ps(p); }
#endif
};
struct BF16 {
  using T = uint16_t;
  static float get(const T *p) { return bf16_to_f32(*p); }
#ifdef __AVX2__
  static __m256 load8(const T *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
#endif
};
struct F16 {
  using T = uint16_t;
  static float get(const T *p) { return f16_to_f32(*p); }
#ifdef __AVX2__
  static __m256 load8(const T *p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))); }
#endif
};

#ifdef __AVX2__
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// Threads per kernel call: MINDCPM_KERNEL_THREADS, else every processor this process may use.
inline int num_threads() {
  static int n = [] {
    const char *env = std::getenv("MINDCPM_KERNEL_THREADS");
    int v = env ? std::atoi(env) : 0;
    return v > 0 ? v : omp_get_num_procs();
  }();
  return n;
}

inline int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

enum class WType { kF32, kBF16, kF16, kOther };
inline WType weight_type(const char *dtype) {
  if (std::strcmp(dtype, "float32") == 0) return WType::kF32;
  if (std::strcmp(dtype, "bfloat16") == 0) return WType::kBF16;
  if (std::strcmp(dtype, "float16") == 0) return WType::kF16;
  return WType::kOther;
}

}  // namespace mindcpm
