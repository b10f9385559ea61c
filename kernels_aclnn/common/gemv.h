// The GEMV machinery of the CPU kernels: y = epilogue(x W^T) for a few rows of x, streaming W
// once per block of rows (near memory bandwidth in decode). x fp32; W fp32 | bf16 | fp16,
// widened in registers. Used by the linear kernels and by the fused attention block.
//   gemv::dispatch(wtype, x, W, M, K, units, epilogue)   the epilogues: Plain, Residual, Swiglu
// Rows of W are split between threads; each thread keeps a block of rows of x hot in cache
// while it streams its rows of W (MR x NR register tile, 8-wide FMA).
#pragma once
#include "cpu_common.h"

namespace mindcpm {
namespace gemv {


// acc[i][j] = dot(x row i, W row j) over K, for MR rows of x and NR rows of W.
template <int MR, int NR, class W>
inline void tile(const float *x, int64_t ldx, const typename W::T *const *rows, int64_t K, float acc[MR][NR]) {
  int64_t k = 0;
#ifdef __AVX2__
  __m256 a[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) a[i][j] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
    for (int j = 0; j < NR; ++j) {
      __m256 w = W::load8(rows[j] + k);
      for (int i = 0; i < MR; ++i) a[i][j] = _mm256_fmadd_ps(xv[i], w, a[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = hsum(a[i][j]);
#else
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = 0.f;
#endif
  for (; k < K; ++k)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] += x[i * ldx + k] * W::get(rows[j] + k);
}

// dot(x, w) over K for one weight row, read as one sequential stream with 4 accumulators.
// For a single row of x with 16-bit weights this beats the MR x NR tile, whose NR rows are NR
// interleaved streams (2% per decode step in bf16 here; for fp32 the tile is 7% faster).
template <class W>
inline float dot_row(const float *x, const typename W::T *w, int64_t K) {
  int64_t k = 0;
  float sum = 0.f;
#ifdef __AVX2__
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), W::load8(w + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), W::load8(w + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), W::load8(w + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), W::load8(w + k + 24), a3);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), W::load8(w + k), a0);
  sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
  for (; k < K; ++k) sum += x[k] * W::get(w + k);
  return sum;
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// The three epilogues: where a block of NR weight rows starting at `unit` goes in y.
struct Plain {  // W rows unit..unit+NR-1 -> y columns unit..
  float *y; int64_t ldy;
  static constexpr int kRowsPerUnit = 1;
  template <int MR, int NR> void store(int64_t m, int64_t unit, float acc[MR][NR]) const {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) y[(m + i) * ldy + unit + j] = acc[i][j];
  }
};
struct Residual {
  float *y; int64_t ldy; const float *r; float scale;
  static constexpr int kRowsPerUnit = 1;
  template <int MR, int NR> void store(int64_t m, int64_t unit, float acc[MR][NR]) const {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) {
        int64_t o = (m + i) * ldy + unit + j;
        y[o] = r[o] + scale * acc[i][j];
      }
  }
};
struct Swiglu {  // NR/2 gate rows then the matching NR/2 up rows -> NR/2 y columns
  float *y; int64_t ldy;
  static constexpr int kRowsPerUnit = 2;
  template <int MR, int NR> void store(int64_t m, int64_t unit, float acc[MR][NR]) const {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR / 2; ++j) y[(m + i) * ldy + unit + j] = silu(acc[i][j]) * acc[i][NR / 2 + j];
  }
};

// Weight rows of `units` output columns: unit u uses row u (Plain/Residual) or rows u and
// u + units (Swiglu: gate and up).
template <class W, class E, int U>
inline void row_pointers(const typename W::T *w, int64_t K, int64_t units, int64_t u,
                         const typename W::T *rows[]) {
  for (int j = 0; j < U; ++j) {
    rows[j] = w + (u + j) * K;
    if (E::kRowsPerUnit == 2) rows[U + j] = w + (units + u + j) * K;
  }
}

template <class W, class E, int U>
inline void unit_block(const float *x, const typename W::T *w, int64_t m0, int64_t m1, int64_t K, int64_t units,
                       int64_t u, const E &epi) {
  constexpr int NR = U * E::kRowsPerUnit;
  const typename W::T *rows[NR];
  row_pointers<W, E, U>(w, K, units, u, rows);
  // 3 x 4 tiles: 12 accumulators hide the FMA latency and leave registers for the loads.
  int64_t m = m0;
  for (; m + 3 <= m1; m += 3) {
    float acc[3][NR];
    tile<3, NR, W>(x + m * K, K, rows, K, acc);
    epi.template store<3, NR>(m, u, acc);
  }
  if (m1 - m == 2) {
    float acc[2][NR];
    tile<2, NR, W>(x + m * K, K, rows, K, acc);
    epi.template store<2, NR>(m, u, acc);
  } else if (m1 - m == 1) {
    float acc[1][NR];
    if constexpr (std::is_same<W, F32>::value) {
      tile<1, NR, W>(x + m * K, K, rows, K, acc);
    } else {
      for (int j = 0; j < NR; ++j) acc[0][j] = dot_row<W>(x + m * K, rows[j], K);
    }
    epi.template store<1, NR>(m, u, acc);
  }
}

// kTileRows weight rows per tile: 8 for a single row of x (8 accumulators, 8 weight streams in
// flight), 4 for more rows (3 x 4 accumulators).
template <class W, class E, int kTileRows>
void run(const float *x, const typename W::T *w, int64_t M, int64_t K, int64_t units, const E &epi) {
  constexpr int U = kTileRows / E::kRowsPerUnit;
  // Rows of x per pass over W: all of a decode batch (W is streamed from memory once), capped
  // so that the block of x stays in L2 (512 KiB) next to the weight rows being multiplied.
  int64_t mb = std::max<int64_t>(3, (512 * 1024 / 4) / std::max<int64_t>(K, 1) / 3 * 3);
  int64_t blocks = (units + U - 1) / U;
  // Claims of at least 64 weight rows (parallel_chunks makes the early ones longer): the last
  // ones are small enough that a descheduled thread holds up little, and even those cost
  // nothing to claim next to streaming them.
  parallel_chunks(blocks, 64 / kTileRows, [&](int64_t b0, int64_t b1) {
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
      int64_t m1 = std::min(M, m0 + mb);
      for (int64_t b = b0; b < b1; ++b) {
        int64_t u = b * U;
        if (u + U <= units) {
          unit_block<W, E, U>(x, w, m0, m1, K, units, u, epi);
        } else {
          for (; u < units; ++u) unit_block<W, E, 1>(x, w, m0, m1, K, units, u, epi);
        }
      }
    }
  });
}

template <class W, class E>
void run_for_rows(const void *w, const float *x, int64_t M, int64_t K, int64_t units, const E &epi) {
  mindcpm_prefer_huge_pages(w, units * E::kRowsPerUnit * K * sizeof(typename W::T));
  const auto *weights = static_cast<const typename W::T *>(w);
  if (M == 1) {
    run<W, E, 8>(x, weights, M, K, units, epi);
  } else {
    run<W, E, 4>(x, weights, M, K, units, epi);
  }
}

template <class E>
int dispatch(const char *wtype, const float *x, const void *w, int64_t M, int64_t K, int64_t units, const E &epi) {
  switch (weight_type(wtype)) {
    case WType::kF32: run_for_rows<F32>(w, x, M, K, units, epi); return 0;
    case WType::kBF16: run_for_rows<BF16>(w, x, M, K, units, epi); return 0;
    case WType::kF16: run_for_rows<F16>(w, x, M, K, units, epi); return 0;
    default: return 1;
  }
}

// x's rows normalised into a buffer reused across calls.
inline const float *rms_normalised(const float *x, const float *g, float eps, int64_t M, int64_t K) {
  thread_local std::vector<float> buffer;
  buffer.resize(M * K);
  for (int64_t m = 0; m < M; ++m) rms_norm_row(x + m * K, g, eps, K, buffer.data() + m * K);
  return buffer.data();
}

}  // namespace gemv
}  // namespace mindcpm
