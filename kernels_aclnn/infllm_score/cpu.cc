// InfLLM-v2 stage 1 + max-pool + top-k (docs/minicpm4.md#infllm-v2-relevance-scores, #infllm-v2-pooling, #infllm-v2-top-k), fp32: which 64-token blocks
// each (row, KV head, query) attends to. The composite twin is mindcpm/layers/sparse.py
// InfLLMv2Attention.select; the conventions are the same (ties to the lower block index, a
// row shorter than dense_len selects every past block).
//   InfllmSelect(q, c1_cache, c2_cache, positions, c1_table, c2_table, meta, selected)
//   q            [B, L, Hq, D]
//   c1/c2_cache  [E, Hkv, D]            compressed keys; row b's C1 entry j is c1_cache[c1_table[b, j]]
//   positions    [B, L] int32           -1 = padding (selects nothing)
//   c1_table     [B, N1] int32          N1 = 4 NB - 1
//   c2_table     [B, N2] int32
//   meta         [7] fp32               scale, init_blocks, window_blocks, topk, dense_len, current, repeat
//   selected     [B, Hkv, L, NB] int32  1 = attend to the block
#include "../common/cpu_common.h"

using namespace mindcpm;

namespace {

constexpr int64_t kStride1 = 16, kKernel1 = 32, kStride2 = 64, kKernel2 = 128, kBlock = 64, kTile = 64;
constexpr int64_t kTileQ = 8;  // queries of one row and KV head scored together

// out[r][j] = scale * rows[r] . keys[j] for r < R, j < n: keys tiled and transposed once for
// all R query rows (the group's heads of several queries), so the inner loop is contiguous FMAs.
void group_scores(const float *const *rows, int64_t G, int64_t D, const float *const *keys, int64_t n, float scale,
                  float *out /* [G][n] */, std::vector<float> &kt) {
  kt.resize(D * kTile);
  for (int64_t j0 = 0; j0 < n; j0 += kTile) {
    const int64_t m = std::min(kTile, n - j0);
    for (int64_t j = 0; j < m; ++j)
      for (int64_t d = 0; d < D; ++d) kt[d * kTile + j] = keys[j0 + j][d];
    for (int64_t g = 0; g < G; ++g) {
      alignas(32) float acc[kTile] = {0.f};
      const float *qg = rows[g];
#ifdef __AVX2__
      __m256 a[8];
      for (int r = 0; r < 8; ++r) a[r] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; ++d) {
        const __m256 qd = _mm256_set1_ps(qg[d]);
        const float *row = &kt[d * kTile];
        for (int r = 0; r < 8; ++r) a[r] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row + 8 * r), a[r]);
      }
      for (int r = 0; r < 8; ++r) _mm256_store_ps(acc + 8 * r, a[r]);
#else
      for (int64_t d = 0; d < D; ++d) {
        const float qd = qg[d], *row = &kt[d * kTile];
        for (int64_t j = 0; j < kTile; ++j) acc[j] += qd * row[j];
      }
#endif
      for (int64_t j = 0; j < m; ++j) out[g * n + j0 + j] = acc[j] * scale;
    }
  }
}

}  // namespace

extern "C" int InfllmSelect(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                            void *) {
  if (nparam != 8) return 1;
  for (int i : {0, 1, 2, 6})
    if (std::strcmp(dtypes[i], "float32") != 0) return 2;
  for (int i : {3, 4, 5, 7})
    if (std::strcmp(dtypes[i], "int32") != 0) return 3;
  const float *q = static_cast<const float *>(params[0]);
  const float *c1 = static_cast<const float *>(params[1]);
  const float *c2 = static_cast<const float *>(params[2]);
  const int32_t *positions = static_cast<const int32_t *>(params[3]);
  const int32_t *t1 = static_cast<const int32_t *>(params[4]);
  const int32_t *t2 = static_cast<const int32_t *>(params[5]);
  const float *meta = static_cast<const float *>(params[6]);
  int32_t *selected = static_cast<int32_t *>(params[7]);

  const int64_t B = shapes[0][0], L = shapes[0][1], Hq = shapes[0][2], D = shapes[0][3];
  const int64_t Hkv = shapes[1][1], N1 = shapes[4][1], N2 = shapes[5][1], NB = shapes[7][3], G = Hq / Hkv;
  const float scale = meta[0], repeat = meta[6];
  const int64_t init_blocks = (int64_t)meta[1], window = (int64_t)meta[2], topk = (int64_t)meta[3];
  const int64_t dense_len = (int64_t)meta[4];
  const bool current = meta[5] != 0.f;

  std::vector<int64_t> lengths(B);
  for (int64_t b = 0; b < B; ++b) {
    int64_t mx = -1;
    for (int64_t i = 0; i < L; ++i) mx = std::max<int64_t>(mx, positions[b * L + i]);
    lengths[b] = mx + 1;
  }

  const int64_t tiles = (L + kTileQ - 1) / kTileQ;
  parallel_chunks(B * Hkv * tiles, 1, [&](int64_t u0, int64_t u1) {
    thread_local std::vector<float> s1, s2, score, pooled, kt;
    thread_local std::vector<const float *> keys, rows;
    thread_local std::vector<int64_t> order;
    for (int64_t unit = u0; unit < u1; ++unit) {
      const int64_t b = unit / (Hkv * tiles), h = unit / tiles % Hkv, i0 = unit % tiles * kTileQ;
      const int64_t i1 = std::min(L, i0 + kTileQ), R = (i1 - i0) * G, lk = lengths[b];
      // Scores of every query of the tile against the kernels the furthest one sees.
      int64_t last = -1;
      for (int64_t i = i0; i < i1; ++i) last = std::max<int64_t>(last, positions[b * L + i]);
      const int64_t n1 = last >= kKernel1 - 1 ? std::min(N1, (last - kKernel1 + 1) / kStride1 + 1) : 0;
      const int64_t n2 = last >= kKernel2 - 1 ? std::min(N2, (last - kKernel2 + 1) / kStride2 + 1) : 0;
      const bool dense = dense_len >= 0 && lk < dense_len;
      rows.resize(R);
      for (int64_t r = 0; r < R; ++r) rows[r] = q + ((b * L + i0 + r / G) * Hq + h * G + r % G) * D;
      keys.resize(std::max<int64_t>(std::max(n1, n2), 1));
      if (!dense && n1 > 0) {
        s1.resize(R * n1);
        for (int64_t j = 0; j < n1; ++j) keys[j] = c1 + ((int64_t)t1[b * N1 + j] * Hkv + h) * D;
        group_scores(rows.data(), R, D, keys.data(), n1, scale, s1.data(), kt);
      }
      if (!dense && current && n2 > 0) {
        s2.resize(R * n2);
        for (int64_t j = 0; j < n2; ++j) keys[j] = c2 + ((int64_t)t2[b * N2 + j] * Hkv + h) * D;
        group_scores(rows.data(), R, D, keys.data(), n2, scale, s2.data(), kt);
      }
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = b * L + i;
      int32_t *sel = selected + ((b * Hkv + h) * L + i) * NB;
      std::fill(sel, sel + NB, 0);
      const int64_t pos = positions[t];
      if (pos < 0) continue;
      const int64_t qb = pos / kBlock;
      if (dense) {  // dense row: every past block
        for (int64_t blk = 0; blk <= std::min(qb, NB - 1); ++blk) sel[blk] = 1;
        continue;
      }
      // Kernels visible to this query (complete and in its past), and existing in the row.
      const int64_t vis1 = pos >= kKernel1 - 1 ? std::min(N1, (pos - kKernel1 + 1) / kStride1 + 1) : 0;
      const int64_t exist1 = lk >= kKernel1 ? std::min(N1, (lk - kKernel1) / kStride1 + 1) : 0;
      const int64_t vis2 = pos >= kKernel2 - 1 ? std::min(N2, (pos - kKernel2 + 1) / kStride2 + 1) : 0;
      const float *q1 = s1.data() + (i - i0) * G * n1, *q2 = s2.data() + (i - i0) * G * n2;
      score.assign(N1, 0.f);
      if (vis1 > 0) {
        std::vector<float> norm(G, 0.f);  // per head: lse (current) or max (June)
        if (current) {
          if (vis2 > 0) {
            for (int64_t g = 0; g < G; ++g) {
              float mx = -INFINITY, sum = 0.f;
              for (int64_t j = 0; j < vis2; ++j) mx = std::max(mx, q2[g * n2 + j]);
              for (int64_t j = 0; j < vis2; ++j) sum += std::exp(q2[g * n2 + j] - mx);
              norm[g] = mx + std::log(sum);
            }
            for (int64_t j = 0; j < vis1; ++j) {
              float acc = 0.f;
              for (int64_t g = 0; g < G; ++g) acc += std::exp(q1[g * n1 + j] - norm[g]);
              score[j] = acc * repeat;
            }
          }  // no visible C2 kernel: every P is 0
        } else {
          std::vector<float> inv(G);
          for (int64_t g = 0; g < G; ++g) {
            float mx = -INFINITY, sum = 0.f;
            for (int64_t j = 0; j < vis1; ++j) mx = std::max(mx, q1[g * n1 + j]);
            for (int64_t j = 0; j < vis1; ++j) sum += std::exp(q1[g * n1 + j] - mx);
            norm[g] = mx, inv[g] = 1.f / sum;
          }
          for (int64_t j = 0; j < vis1; ++j) {
            float acc = 0.f;
            for (int64_t g = 0; g < G; ++g) acc += std::exp(q1[g * n1 + j] - norm[g]) * inv[g];
            score[j] = acc * repeat;
          }
        }
      }
      for (int64_t j = exist1; j < N1; ++j) score[j] = -INFINITY;
      // Max-pool (kernels 4b-1 .. 4b+3), then the forced blocks.
      pooled.assign(NB, -INFINITY);
      for (int64_t blk = 0; blk < NB; ++blk) {
        for (int64_t j = std::max<int64_t>(4 * blk - 1, 0); j <= std::min(4 * blk + 3, N1 - 1); ++j)
          pooled[blk] = std::max(pooled[blk], score[j]);
        const bool local = current ? (blk >= qb - window && blk <= qb) : (blk > qb - window && blk <= qb);
        if (blk < init_blocks) pooled[blk] = INFINITY;
        else if (local) pooled[blk] = current ? INFINITY : -INFINITY;
      }
      // Top-k, ties to the lower index, k = min(topk, the row's blocks).
      const int64_t k = std::min(std::min(topk, (lk + kBlock - 1) / kBlock), NB);
      order.resize(NB);
      for (int64_t blk = 0; blk < NB; ++blk) order[blk] = blk;
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t c) {
        return pooled[a] > pooled[c] || (pooled[a] == pooled[c] && a < c);
      });
      for (int64_t r = 0; r < k; ++r) {
        const int64_t blk = order[r];
        if (current ? blk <= qb : blk < qb) sel[blk] = 1;
      }
      if (!current)  // stage 2 of the June code adds the local window itself
        for (int64_t blk = std::max<int64_t>(qb - window + 1, 0); blk <= std::min(qb, NB - 1); ++blk) sel[blk] = 1;
    }
    }
  });
  return 0;
}
