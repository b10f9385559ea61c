// The attention kernels' shared fp32 vector layer: dot products, exp, softmax and the
// probability-weighted sum of value rows. AVX2/FMA when the build has them, scalar otherwise.
//   dot(a, b, n)                                  sum a[i] b[i]
//   exp_shifted(x, n, shift) -> sum               x[j] = exp(x[j] - shift) in place
//   softmax(s, n)                                 in place
//   weighted_sum(p, row, n, D, corr, out)         out = corr * out + sum_j p[j] row(j)[0..D)
#pragma once
#include "cpu_common.h"

namespace mindcpm {
namespace vec {

inline float dot(const float *a, const float *b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef __AVX2__
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  s = hsum(acc);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

#ifdef __AVX2__
// exp(v) for v <= 0 (Cephes expf: v = k ln2 + r, a degree-5 polynomial in r; relative error
// ~2e-7). Below -87.3 (and -inf, a masked score) it is exactly 0 rather than a denormal.
inline __m256 exp_nonpositive(__m256 v) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(v, lo, _CMP_LT_OQ);
  v = _mm256_max_ps(v, lo);
  const __m256 k = _mm256_floor_ps(_mm256_fmadd_ps(v, _mm256_set1_ps(1.44269504f), _mm256_set1_ps(0.5f)));
  v = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), v);
  v = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), v);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(v, v), _mm256_add_ps(v, _mm256_set1_ps(1.f)));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(pow2)));
}
#endif

// x[j] = exp(x[j] - shift) for j < n, shift >= every x[j]; returns their sum.
inline float exp_shifted(float *x, int64_t n, float shift) {
  int64_t j = 0;
  float sum = 0.f;
#ifdef __AVX2__
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j), sh));
    _mm256_storeu_ps(x + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; j < n; ++j) sum += (x[j] = std::exp(x[j] - shift));
  return sum;
}

// s[0..n) -> softmax(s) in place, n >= 1.
inline void softmax(float *s, int64_t n) {
  float mx = s[0];
  int64_t j = 1;
#ifdef __AVX2__
  // Eight lanes: the scalar max is one dependent chain (~1% of a 512-token prefill).
  // max_ps(s, m) keeps m when s is NaN, as std::max(mx, s[j]) does.
  __m256 m8 = _mm256_set1_ps(mx);
  for (; j + 8 <= n; j += 8) m8 = _mm256_max_ps(_mm256_loadu_ps(s + j), m8);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m8);
  for (float v : lanes) mx = std::max(mx, v);
#endif
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  const float inv = 1.f / exp_shifted(s, n, mx);
  j = 0;
#ifdef __AVX2__
  for (const __m256 iv = _mm256_set1_ps(inv); j + 8 <= n; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), iv));
#endif
  for (; j < n; ++j) s[j] *= inv;
}

#ifdef __AVX2__
// out[0..8 NV) = corr * out + sum_j p[j] row(j)[0..8 NV), the accumulators held in registers.
template <int NV, class Row>
inline void weighted_block(const float *p, const Row &row, int64_t n, int64_t d, float corr, float *out) {
  __m256 a[NV];
  const __m256 c = _mm256_set1_ps(corr);
  for (int i = 0; i < NV; ++i)
    a[i] = corr == 0.f ? _mm256_setzero_ps() : _mm256_mul_ps(c, _mm256_loadu_ps(out + 8 * i));
  for (int64_t j = 0; j < n; ++j) {
    const __m256 w = _mm256_set1_ps(p[j]);
    const float *v = row(j) + d;
    for (int i = 0; i < NV; ++i) a[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * i), a[i]);
  }
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out + 8 * i, a[i]);
}
#endif

// out[0..D) = corr * out + sum_j p[j] row(j)[0..D) for j < n; row(j) is value row j's pointer.
// corr == 0 overwrites out (which may hold anything, NaN included).
template <class Row>
inline void weighted_sum(const float *p, const Row &row, int64_t n, int64_t D, float corr, float *out) {
  int64_t d = 0;
#ifdef __AVX2__
  for (; d + 64 <= D; d += 64) weighted_block<8>(p, row, n, d, corr, out + d);
  switch ((D - d) / 8) {
    case 7: weighted_block<7>(p, row, n, d, corr, out + d); break;
    case 6: weighted_block<6>(p, row, n, d, corr, out + d); break;
    case 5: weighted_block<5>(p, row, n, d, corr, out + d); break;
    case 4: weighted_block<4>(p, row, n, d, corr, out + d); break;
    case 3: weighted_block<3>(p, row, n, d, corr, out + d); break;
    case 2: weighted_block<2>(p, row, n, d, corr, out + d); break;
    case 1: weighted_block<1>(p, row, n, d, corr, out + d); break;
    default: break;
  }
  d += (D - d) / 8 * 8;
#endif
  for (; d < D; ++d) {
    float acc = corr == 0.f ? 0.f : out[d] * corr;
    for (int64_t j = 0; j < n; ++j) acc += p[j] * row(j)[d];
    out[d] = acc;
  }
}

}  // namespace vec
}  // namespace mindcpm
