// InfLLM-v2 stage 2 (spec minicpm4.md §3.6): attention restricted to the selected 64-token
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
// One (token, kv head) is a unit of work: its G query heads share the keys it loads.
#include "../common/cpu_common.h"

using namespace mindcpm;

namespace {

constexpr int64_t kBlock = 64;

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

inline void axpy(float a, const float *x, float *y, int64_t n) {
  int64_t i = 0;
#ifdef __AVX2__
  __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

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

  parallel_chunks(B * L * Hkv, 1, [&](int64_t u0, int64_t u1) {
    thread_local std::vector<float> scores, acc;
    thread_local std::vector<const float *> keys, values;
    scores.resize(G * max_keys), acc.resize(D), keys.resize(max_keys), values.resize(max_keys);
    for (int64_t unit = u0; unit < u1; ++unit) {
      const int64_t t = unit / Hkv, h = unit % Hkv, b = t / L, i = t % L;
      const int64_t pos = std::min<int64_t>(positions[t], max_keys - 1);
      float *o = out + t * Hq * D + h * G * D;
      if (positions[t] < 0) {
        std::memset(o, 0, G * D * sizeof(float));
        continue;
      }
      // The keys of the selected blocks up to the query's position.
      const int32_t *sel = selected + ((b * Hkv + h) * L + i) * NB;
      const int32_t *table = tables + b * nb;
      int64_t n = 0;
      for (int64_t blk = 0; blk <= pos / kBlock; ++blk) {
        if (!sel[blk]) continue;
        const int64_t end = std::min(blk * kBlock + kBlock, pos + 1);
        for (int64_t j = blk * kBlock; j < end; ++j) {
          const int64_t slot = (int64_t)table[j / bs] * bs + j % bs;
          keys[n] = kc + (slot * Hkv + h) * D;
          values[n++] = vc + (slot * Hkv + h) * D;
        }
      }
      const float *qh = q + t * Hq * D + h * G * D;
      if (n == 0) {  // cannot happen for a real query (its own block is always selected)
        std::memset(o, 0, G * D * sizeof(float));
        continue;
      }
      for (int64_t j = 0; j < n; ++j)
        for (int64_t g = 0; g < G; ++g) scores[g * max_keys + j] = dot(qh + g * D, keys[j], D) * scale;
      for (int64_t g = 0; g < G; ++g) {
        float *s = &scores[g * max_keys];
        float mx = s[0];
        for (int64_t j = 1; j < n; ++j) mx = std::max(mx, s[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
        const float inv = 1.f / sum;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) axpy(s[j] * inv, values[j], acc.data(), D);
        std::memcpy(o + g * D, acc.data(), D * sizeof(float));
      }
    }
  });
  return 0;
}
