// The GEMV machinery of the CPU kernels: y = epilogue(x W^T) for a few rows of x, streaming W
// once per block of rows (near memory bandwidth in decode). x fp32; W fp32 | bf16 | fp16,
// widened in registers. Used by the linear kernels and by the fused attention block.
//   gemv::dispatch(wtype, x, W, M, K, units, epilogue)   the epilogues: Plain, Residual, Swiglu
// Rows of W are split between threads; each thread keeps a block of rows of x hot in cache
// while it streams its rows of W (MR x NR register tile, 8-wide FMA). A single row of x (decode)
// reads 4 far-apart rows of W side by side (spaced_units).
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

// Weight rows of U output columns u, u + stride, ..., u + (U - 1) stride of `units`: unit v uses
// row v (Plain/Residual), or rows v and v + units (Swiglu: gate and up; the up rows after all
// the gate rows).
template <class W, class E, int U>
inline void row_pointers(const typename W::T *w, int64_t K, int64_t units, int64_t u, int64_t stride,
                         const typename W::T *rows[]) {
  for (int j = 0; j < U; ++j) {
    rows[j] = w + (u + j * stride) * K;
    if (E::kRowsPerUnit == 2) rows[U + j] = w + (units + u + j * stride) * K;
  }
}

template <class W, class E, int U>
inline void unit_block(const float *x, const typename W::T *w, int64_t m0, int64_t m1, int64_t K, int64_t units,
                       int64_t u, const E &epi) {
  constexpr int NR = U * E::kRowsPerUnit;
  const typename W::T *rows[NR];
  row_pointers<W, E, U>(w, K, units, u, 1, rows);
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
    tile<1, NR, W>(x + m * K, K, rows, K, acc);
    epi.template store<1, NR>(m, u, acc);
  }
}

// One row of x over units [u0, u1): U units a tile, spaced evenly through the range, so that the
// tile's U x rows-per-unit weight rows are sequential streams far apart in memory. Streams from
// far-apart rows read faster than adjacent rows do. Measured here in decode: bf16 12% faster than
// reading one row at a time, fp32 6% faster than tiles of 8 adjacent rows, and 4 streams a tile
// 2-4% faster than 8; presumably far-apart streams keep more DRAM banks busy.
template <class W, class E, int U>
inline void spaced_units(const float *x, const typename W::T *w, int64_t K, int64_t units, int64_t u0, int64_t u1,
                         const E &epi) {
  constexpr int R = E::kRowsPerUnit;
  const int64_t span = (u1 - u0) / U;
  for (int64_t i = 0; i < span; ++i) {
    const typename W::T *rows[U * R];
    row_pointers<W, E, U>(w, K, units, u0 + i, span, rows);
    float acc[1][U * R];
    tile<1, U * R, W>(x, K, rows, K, acc);
    for (int j = 0; j < U; ++j) {
      float one[1][R];
      one[0][0] = acc[0][j];
      if (R == 2) one[0][R - 1] = acc[0][U + j];
      epi.template store<1, R>(0, u0 + i + j * span, one);
    }
  }
  for (int64_t u = u0 + span * U; u < u1; ++u) unit_block<W, E, 1>(x, w, 0, 1, K, units, u, epi);
}

// y = epilogue(x W^T) over the pool's threads. Claims are at least 64 weight rows
// (parallel_chunks makes the early ones longer): the last ones are small enough that a
// descheduled thread holds up little, and even those cost nothing to claim next to streaming them.
template <class W, class E>
void run(const float *x, const typename W::T *w, int64_t M, int64_t K, int64_t units, const E &epi) {
  constexpr int R = E::kRowsPerUnit;
  if (M == 1) {  // decode: bound by the memory bandwidth
    parallel_chunks(units, 64 / R, [&](int64_t u0, int64_t u1) {
      spaced_units<W, E, 4 / R>(x, w, K, units, u0, u1, epi);
    });
    return;
  }
  constexpr int U = 4 / R;  // 3 x 4 tiles
  // Rows of x per pass over W: all of a decode batch (W is streamed from memory once), capped
  // so that the block of x stays in L2 (512 KiB) next to the weight rows being multiplied.
  int64_t mb = std::max<int64_t>(3, (512 * 1024 / 4) / std::max<int64_t>(K, 1) / 3 * 3);
  int64_t blocks = (units + U - 1) / U;
  parallel_chunks(blocks, 64 / 4, [&](int64_t b0, int64_t b1) {
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
  run<W, E>(x, static_cast<const typename W::T *>(w), M, K, units, epi);
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
