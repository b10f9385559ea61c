// InfLLM-v2 stage 2 (docs/minicpm4.md#infllm-v2-block-sparse-attention): attention restricted to the selected 64-token
// blocks, over the slot-major paged KV cache, fp32. The composite twin is
// mindcpm/layers/sparse.py InfLLMv2Attention.attend.
//   BlockSparseAttention(q, k_cache, v_cache, positions, block_tables, selected, meta, out)
//   q            [B, L, Hq, D]
//   k/v_cache    [S, Hkv, D]              slot-major; row b's key j is in slot table[j / bs] * bs + j % bs
//   positions    [B, L] int32             -1 = padding (output zeros)
//   block_tables [B, nb] int32
//   selected     [B, Hkv, L, NB] int32    1 = query attends to 64-token block (shared by the group)
//   meta         [2] fp32                 scale, KV block size
//   out          [B, L, Hq * D]
// Only the selected blocks are read; keys after the query's position are masked (token-causal).
// One (token, kv head) is a unit of work: its G query heads share the keys it loads, block by
// block, with a running softmax (K^T of a block makes the scores contiguous FMAs).
#include "../common/vec.h"

using namespace mindcpm;

namespace {

constexpr int64_t kBlock = 64, kTileQ = 8;

// One query token's G heads against one 64-token block, folded into a running (flash-style)
// softmax: m = running max, l = running sum, o = unnormalised output, per head.
struct Unit {
  int64_t G, D;
  std::vector<float> s, m, l, o;
  void reset(int64_t g, int64_t d) {
    G = g, D = d;
    s.resize(G * kBlock), m.assign(G, -INFINITY), l.assign(G, 0.f), o.assign(G * D, 0.f);
  }
  // kt: the block's K^T [D][64] (so a head's 64 scores are contiguous FMAs over d);
  // values: row pointers; n <= 64 visible tokens.
  void block(const float *q, const float *kt, const float *const *values, int64_t n, float scale) {
    for (int64_t g = 0; g < G; ++g) {
      float *sg = &s[g * kBlock];
      scores(q + g * D, kt, sg);
      float mx = m[g];
      for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sg[j] *= scale);
      const float corr = std::exp(m[g] - mx);
      const float sum = vec::exp_shifted(sg, n, mx);
      l[g] = l[g] * corr + sum;
      m[g] = mx;
      vec::weighted_sum(sg, [&](int64_t j) { return values[j]; }, n, D, corr, &o[g * D]);
    }
  }
  // sg[0..63] = q . K^T, the 64 accumulators held in registers.
  void scores(const float *qg, const float *kt, float *sg) const {
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t d = 0; d < D; ++d) {
      const __m256 qd = _mm256_set1_ps(qg[d]);
      const float *row = &kt[d * kBlock];
      a0 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row), a0);
      a1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row + 8), a1);
      a2 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row + 16), a2);
      a3 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row + 24), a3);
      a4 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row + 32), a4);
      a5 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row + 40), a5);
      a6 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row + 48), a6);
      a7 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row + 56), a7);
    }
    _mm256_storeu_ps(sg, a0), _mm256_storeu_ps(sg + 8, a1), _mm256_storeu_ps(sg + 16, a2);
    _mm256_storeu_ps(sg + 24, a3), _mm256_storeu_ps(sg + 32, a4), _mm256_storeu_ps(sg + 40, a5);
    _mm256_storeu_ps(sg + 48, a6), _mm256_storeu_ps(sg + 56, a7);
#else
    for (int64_t j = 0; j < kBlock; ++j) sg[j] = 0.f;
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = 0; j < kBlock; ++j) sg[j] += qg[d] * kt[d * kBlock + j];
#endif
  }
  void write(float *out) const {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) out[g * D + d] = o[g * D + d] / l[g];
  }
};

}  // namespace

extern "C" int BlockSparseAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *, void *) {
  if (nparam != 8) return 1;
  for (int i : {0, 1, 2, 6, 7})
    if (std::strcmp(dtypes[i], "float32") != 0) return 2;
  for (int i : {3, 4, 5})
    if (std::strcmp(dtypes[i], "int32") != 0) return 3;
  const float *q = static_cast<const float *>(params[0]);
  const float *kc = static_cast<const float *>(params[1]);
  const float *vc = static_cast<const float *>(params[2]);
  const int32_t *positions = static_cast<const int32_t *>(params[3]);
  const int32_t *tables = static_cast<const int32_t *>(params[4]);
  const int32_t *selected = static_cast<const int32_t *>(params[5]);
  const float *meta = static_cast<const float *>(params[6]);
  float *out = static_cast<float *>(params[7]);

  const int64_t B = shapes[0][0], L = shapes[0][1], Hq = shapes[0][2], D = shapes[0][3];
  const int64_t Hkv = shapes[1][1], nb = shapes[4][1], NB = shapes[5][3], G = Hq / Hkv;
  const float scale = meta[0];
  const int64_t bs = (int64_t)meta[1];
  const int64_t max_keys = std::min(nb * bs, NB * kBlock);

  // A unit is a tile of consecutive queries of one row and KV head: they select nearly the
  // same blocks, so each block's keys are loaded and transposed once for the whole tile.
  const int64_t tiles = (L + kTileQ - 1) / kTileQ;
  parallel_chunks(B * Hkv * tiles, 1, [&](int64_t u0, int64_t u1) {
    thread_local std::vector<Unit> state(kTileQ);
    thread_local std::vector<float> kt;
    kt.resize(D * kBlock);
    const float *values[kBlock];
    for (int64_t unit = u0; unit < u1; ++unit) {
      const int64_t b = unit / (Hkv * tiles), h = unit / tiles % Hkv, i0 = unit % tiles * kTileQ;
      const int64_t i1 = std::min(L, i0 + kTileQ);
      const int32_t *table = tables + b * nb;
      int64_t last = -1;  // the tile's furthest position
      for (int64_t i = i0; i < i1; ++i) {
        state[i - i0].reset(G, D);
        last = std::max<int64_t>(last, std::min<int64_t>(positions[b * L + i], max_keys - 1));
      }
      for (int64_t blk = 0; blk <= last / kBlock && last >= 0; ++blk) {
        bool wanted = false;
        for (int64_t i = i0; i < i1 && !wanted; ++i)
          wanted = positions[b * L + i] >= blk * kBlock && selected[((b * Hkv + h) * L + i) * NB + blk];
        if (!wanted) continue;
        const int64_t first = blk * kBlock, n = std::min(kBlock, last + 1 - first);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t tok = first + j, slot = (int64_t)table[tok / bs] * bs + tok % bs;
          const float *k = kc + (slot * Hkv + h) * D;
          for (int64_t d = 0; d < D; ++d) kt[d * kBlock + j] = k[d];
          values[j] = vc + (slot * Hkv + h) * D;
        }
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t pos = std::min<int64_t>(positions[b * L + i], max_keys - 1);
          if (pos < first || !selected[((b * Hkv + h) * L + i) * NB + blk]) continue;
          const int64_t t = b * L + i;
          state[i - i0].block(q + t * Hq * D + h * G * D, kt.data(), values, std::min(n, pos + 1 - first), scale);
        }
      }
      for (int64_t i = i0; i < i1; ++i) {
        float *o = out + (b * L + i) * Hq * D + h * G * D;
        if (positions[b * L + i] >= 0 && state[i - i0].l[0] > 0.f) state[i - i0].write(o);
        else std::memset(o, 0, G * D * sizeof(float));  // padding (a real query always has keys)
      }
    }
  });
  return 0;
}
