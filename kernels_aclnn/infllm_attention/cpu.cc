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
// One (token, kv head) is a unit of work: its G query heads share the keys it loads, block by
// block, with a running softmax (K^T of a block makes the scores contiguous FMAs).
#include "../common/cpu_common.h"

using namespace mindcpm;

namespace {

constexpr int64_t kBlock = 64;

// One query token's G heads against one 64-token block, folded into a running (flash-style)
// softmax: m = running max, l = running sum, o = unnormalised output, per head.
struct Unit {
  int64_t G, D;
  std::vector<float> kt, s, m, l, o;
  void reset(int64_t g, int64_t d) {
    G = g, D = d;
    kt.assign(D * kBlock, 0.f), s.resize(G * kBlock), m.assign(G, -INFINITY), l.assign(G, 0.f), o.assign(G * D, 0.f);
  }
  // keys/values: n <= 64 row pointers of this block's visible tokens.
  void block(const float *q, const float *const *keys, const float *const *values, int64_t n, float scale) {
    // K^T of the block, so that a head's 64 scores are contiguous FMAs over d.
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < D; ++d) kt[d * kBlock + j] = keys[j][d];
    for (int64_t g = 0; g < G; ++g) {
      float *sg = &s[g * kBlock];
      float acc[kBlock] = {0.f};
      const float *qg = q + g * D;
      for (int64_t d = 0; d < D; ++d) {
        const float qd = qg[d], *row = &kt[d * kBlock];
        for (int64_t j = 0; j < kBlock; ++j) acc[j] += qd * row[j];
      }
      float mx = m[g];
      for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sg[j] = acc[j] * scale);
      const float corr = std::exp(m[g] - mx);
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) sum += (sg[j] = std::exp(sg[j] - mx));
      l[g] = l[g] * corr + sum;
      m[g] = mx;
      float *og = &o[g * D];
      if (corr != 1.f)
        for (int64_t d = 0; d < D; ++d) og[d] *= corr;
      for (int64_t j = 0; j < n; ++j) {
        const float p = sg[j], *v = values[j];
        for (int64_t d = 0; d < D; ++d) og[d] += p * v[d];
      }
    }
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

  parallel_chunks(B * L * Hkv, 1, [&](int64_t u0, int64_t u1) {
    thread_local Unit unit_state;
    const float *keys[kBlock], *values[kBlock];
    for (int64_t unit = u0; unit < u1; ++unit) {
      const int64_t t = unit / Hkv, h = unit % Hkv, b = t / L, i = t % L;
      float *o = out + t * Hq * D + h * G * D;
      if (positions[t] < 0) {
        std::memset(o, 0, G * D * sizeof(float));
        continue;
      }
      const int64_t pos = std::min<int64_t>(positions[t], max_keys - 1);
      const int32_t *sel = selected + ((b * Hkv + h) * L + i) * NB;
      const int32_t *table = tables + b * nb;
      Unit &u = unit_state;
      u.reset(G, D);
      // Only the selected blocks up to the query's own are read; keys past it are masked.
      for (int64_t blk = 0; blk <= pos / kBlock; ++blk) {
        if (!sel[blk]) continue;
        const int64_t first = blk * kBlock, n = std::min(kBlock, pos + 1 - first);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t tok = first + j, slot = (int64_t)table[tok / bs] * bs + tok % bs;
          keys[j] = kc + (slot * Hkv + h) * D;
          values[j] = vc + (slot * Hkv + h) * D;
        }
        u.block(q + t * Hq * D + h * G * D, keys, values, n, scale);
      }
      if (u.l[0] > 0.f) u.write(o);
      else std::memset(o, 0, G * D * sizeof(float));  // no selected key: not reachable for a real query
    }
  });
  return 0;
}
