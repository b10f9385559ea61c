// RoPE + KV-cache write + causal paged attention (GQA) in one kernel, fp32.
//   RopePagedAttention(qkv, cos, sin, positions, slot_mapping, block_tables, k_cache, v_cache, meta, out)
//   qkv          [B, L, (Hq + 2 Hkv) * D]   the fused projection's output, q | k | v
//   cos, sin     [P, R]                     NeoX rotate-half tables (LongRoPE scaling included) over
//                                           the first R <= D dims; the rest pass through (partial RoPE)
//   positions    [B, L] int32               -1 = padding (not written, output zeros)
//   slot_mapping [B * L] int32              cache slot of each token
//   block_tables [B, nb] int32              row b's key j lives in slot table[j / bs] * bs + j % bs
//   k/v_cache    [S, Hkv, D] fp32           slot-major; written IN PLACE (they are Parameters)
//   meta         [2] fp32                   scale, block size
//   out          [B, L, Hq * D]
// Every token's K/V is written before any query attends, so a prefill chunk sees itself.
// Query heads h*G .. h*G+G-1 share KV head h; a (token, kv head) pair is one unit of work.
#include "../common/cpu_common.h"

using namespace mindcpm;

namespace {

inline void rope(const float *x, const float *cos, const float *sin, int64_t R, int64_t D, float *y) {
  int64_t half = R / 2;
  std::memcpy(y + R, x + R, (D - R) * sizeof(float));
  for (int64_t i = 0; i < half; ++i) {
    y[i] = x[i] * cos[i] - x[i + half] * sin[i];
    y[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
  }
}

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

extern "C" int RopePagedAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *, void *) {
  if (nparam != 10) return 1;
  for (int i : {0, 1, 2, 6, 7, 8, 9})
    if (std::strcmp(dtypes[i], "float32") != 0) return 2;
  const float *qkv = static_cast<const float *>(params[0]);
  const float *cos = static_cast<const float *>(params[1]);
  const float *sin = static_cast<const float *>(params[2]);
  const int32_t *positions = static_cast<const int32_t *>(params[3]);
  const int32_t *slots = static_cast<const int32_t *>(params[4]);
  const int32_t *tables = static_cast<const int32_t *>(params[5]);
  float *kc = static_cast<float *>(params[6]);
  float *vc = static_cast<float *>(params[7]);
  const float *meta = static_cast<const float *>(params[8]);
  float *out = static_cast<float *>(params[9]);

  const int64_t B = shapes[3][0], L = shapes[3][1], T = B * L, nb = shapes[5][1];
  const int64_t Hkv = shapes[6][1], D = shapes[6][2], P = shapes[1][0], R = shapes[1][1];
  const int64_t width = shapes[0][ndims[0] - 1], Hq = width / D - 2 * Hkv, G = Hq / Hkv;
  const float scale = meta[0];
  const int64_t bs = (int64_t)meta[1];
  const int64_t max_keys = nb * bs;

  // 1. Rotate and write every real token's K and V.
  parallel_chunks(T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t pos = positions[t];
      if (pos < 0 || pos >= P) continue;
      const float *row = qkv + t * width;
      for (int64_t h = 0; h < Hkv; ++h) {
        rope(row + (Hq + h) * D, cos + pos * R, sin + pos * R, R, D, kc + (slots[t] * Hkv + h) * D);
        std::memcpy(vc + (slots[t] * Hkv + h) * D, row + (Hq + Hkv + h) * D, D * sizeof(float));
      }
    }
  });

  // 2. Attention of every (token, kv head, slice of its query heads) over keys 0..position of
  // its row. Units are handed out one at a time because their cost grows with the position. A
  // kv head's query heads are split into slices only when there are too few (token, kv head)
  // pairs to keep every thread busy (decode: 1 token x 2 kv heads on MiniCPM4): each slice then
  // re-reads the head's keys and values, which a decode step's cache holds in L2/L3.
  const int64_t pairs = T * Hkv;
  const int64_t parts = std::min<int64_t>(G, std::max<int64_t>(1, (2 * num_threads() + pairs - 1) / pairs));
  parallel_chunks(pairs * parts, 1, [&](int64_t u0, int64_t u1) {
    thread_local std::vector<float> q, scores, acc;
    q.resize(G * D), scores.resize(G * max_keys), acc.resize(D);
    for (int64_t unit = u0; unit < u1; ++unit) {
      const int64_t pair = unit / parts, part = unit % parts;
      const int64_t t = pair / Hkv, h = pair % Hkv, b = t / L;
      const int64_t g0 = part * G / parts, g1 = (part + 1) * G / parts;
      int64_t pos = positions[t];
      float *o = out + t * Hq * D + h * G * D;
      if (pos < 0 || pos >= P) {
        std::memset(o + g0 * D, 0, (g1 - g0) * D * sizeof(float));
        continue;
      }
      pos = std::min(pos, max_keys - 1);
      const float *row = qkv + t * width;
      for (int64_t g = g0; g < g1; ++g) rope(row + (h * G + g) * D, cos + pos * R, sin + pos * R, R, D, &q[g * D]);
      const int32_t *table = tables + b * nb;
      int64_t n = pos + 1;
      for (int64_t j = 0; j < n; ++j) {
        const float *k = kc + ((int64_t)table[j / bs] * bs + j % bs) * Hkv * D + h * D;
        for (int64_t g = g0; g < g1; ++g) scores[g * max_keys + j] = dot(&q[g * D], k, D) * scale;
      }
      for (int64_t g = g0; g < g1; ++g) {
        float *s = &scores[g * max_keys];
        float mx = s[0];
        for (int64_t j = 1; j < n; ++j) mx = std::max(mx, s[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
        float inv = 1.f / sum;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const float *v = vc + ((int64_t)table[j / bs] * bs + j % bs) * Hkv * D + h * D;
          axpy(s[j] * inv, v, acc.data(), D);
        }
        std::memcpy(o + g * D, acc.data(), D * sizeof(float));
      }
    }
  });
  return 0;
}
