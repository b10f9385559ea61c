// RoPE, the KV-cache write and causal paged attention (GQA) over fp32 q|k|v rows, shared by
// the attention kernels (kernels_aclnn/paged_attention) and the quantized attention block
// (kernels_aclnn/quant_linear), which run it between their own projections. The layouts are
// the ones kernels_aclnn/paged_attention/cpu.cc documents for RopePagedAttention.
#pragma once

#include "gemv.h"
#include "vec.h"

namespace mindcpm {
namespace paged {

inline void rope(const float *x, const float *cos, const float *sin, int64_t R, int64_t D, float *y) {
  int64_t half = R / 2;
  std::memcpy(y + R, x + R, (D - R) * sizeof(float));
  for (int64_t i = 0; i < half; ++i) {
    y[i] = x[i] * cos[i] - x[i + half] * sin[i];
    y[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
  }
}

// s[j] = scale * dot(q, keys[j]) for j < n (key j at kc + offsets[j]). Eight keys at a time share
// one horizontal reduction instead of eight.
inline void scores_of(const float *q, const float *kc, const int64_t *offsets, int64_t n, int64_t D, float scale,
               float *s) {
  int64_t j = 0;
#ifdef __AVX2__
  const int64_t Dv = D / 8 * 8;
  for (; j + 8 <= n; j += 8) {
    __m256 a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < Dv; d += 8) {
      __m256 qv = _mm256_loadu_ps(q + d);
      for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kc + offsets[j + i] + d), a[i]);
    }
    // Lane i of the result is the sum of a[i].
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(s + j, _mm256_mul_ps(sum, _mm256_set1_ps(scale)));
    for (int64_t d = Dv; d < D; ++d)
      for (int i = 0; i < 8; ++i) s[j + i] += scale * q[d] * kc[offsets[j + i] + d];
  }
#endif
  for (; j < n; ++j) s[j] = vec::dot(q, kc + offsets[j], D) * scale;
}

// The cache and position inputs of both entry points, in their order from `first` on:
// cos, sin, positions, slot_mapping, block_tables, k_cache, v_cache, meta.
struct CacheArgs {
  const float *cos, *sin, *meta;
  const int32_t *positions, *slots, *tables;
  float *kc, *vc;
  int64_t B, L, nb, Hkv, D, P, R;
  CacheArgs(void **params, int64_t **shapes, int first)
      : cos(static_cast<const float *>(params[first])), sin(static_cast<const float *>(params[first + 1])),
        meta(static_cast<const float *>(params[first + 7])),
        positions(static_cast<const int32_t *>(params[first + 2])),
        slots(static_cast<const int32_t *>(params[first + 3])),
        tables(static_cast<const int32_t *>(params[first + 4])), kc(static_cast<float *>(params[first + 5])),
        vc(static_cast<float *>(params[first + 6])), B(shapes[first + 2][0]), L(shapes[first + 2][1]),
        nb(shapes[first + 4][1]), Hkv(shapes[first + 5][1]), D(shapes[first + 5][2]), P(shapes[first][0]),
        R(shapes[first][1]) {}
};

inline bool all_fp32(const char **dtypes, std::initializer_list<int> which) {
  for (int i : which)
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  return true;
}

inline void rope_paged_attention(const float *qkv, int64_t width, const CacheArgs &c, float *out) {
  const int64_t B = c.B, L = c.L, T = B * L, nb = c.nb, Hkv = c.Hkv, D = c.D, P = c.P, R = c.R;
  const float *cos = c.cos, *sin = c.sin;
  const int32_t *positions = c.positions, *slots = c.slots, *tables = c.tables;
  float *kc = c.kc, *vc = c.vc;
  const int64_t Hq = width / D - 2 * Hkv, G = Hq / Hkv;
  const float scale = c.meta[0];
  const int64_t bs = (int64_t)c.meta[1];
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
  // A unit's query heads walk the keys in blocks of kKeyBlock: a block's K (then V) rows are read
  // from memory once and stay in L2 for all of them, instead of each head streaming the whole
  // context (at 3000 keys a kv head's K and V exceed L2, and its 8 query heads read them 8 times).
  // Up to kKeyBlock keys the order of every sum is the single pass's.
  constexpr int64_t kKeyBlock = 256;
  parallel_chunks(pairs * parts, 1, [&](int64_t u0, int64_t u1) {
    thread_local std::vector<float> q, scores;  // per query head of the unit: its rotated q, its scores
    thread_local std::vector<int64_t> offsets;  // key j's K/V row: kc / vc + offsets[j]
    q.resize(G * D), scores.resize(G * max_keys), offsets.resize(max_keys);
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
      const int32_t *table = tables + b * nb;
      const int64_t n = pos + 1;
      for (int64_t j = 0; j < n; ++j) offsets[j] = (((int64_t)table[j / bs] * bs + j % bs) * Hkv + h) * D;
      for (int64_t g = g0; g < g1; ++g) rope(row + (h * G + g) * D, cos + pos * R, sin + pos * R, R, D, q.data() + g * D);
      for (int64_t j0 = 0; j0 < n; j0 += kKeyBlock)
        for (int64_t g = g0; g < g1; ++g)
          scores_of(q.data() + g * D, kc, offsets.data() + j0, std::min(kKeyBlock, n - j0), D, scale,
                    scores.data() + g * max_keys + j0);
      for (int64_t g = g0; g < g1; ++g) vec::softmax(scores.data() + g * max_keys, n);
      for (int64_t j0 = 0; j0 < n; j0 += kKeyBlock)
        for (int64_t g = g0; g < g1; ++g)
          vec::weighted_sum(scores.data() + g * max_keys + j0, [&](int64_t j) { return vc + offsets[j0 + j]; },
                            std::min(kKeyBlock, n - j0), D, j0 == 0 ? 0.f : 1.f, o + g * D);
    }
  });
}

}  // namespace paged
}  // namespace mindcpm
