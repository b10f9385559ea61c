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
//   RmsNormAttentionBlock(x, g, eps, Wqkv, cos, ..., meta, Wo, r, scale, y): the whole attention
//   block of a decoder layer, the projections around it included (see its definition below).
// Every token's K/V is written before any query attends, so a prefill chunk sees itself.
// Query heads h*G .. h*G+G-1 share KV head h; a (token, kv head) pair is one unit of work.
#include "../common/paged_attention.h"

using namespace mindcpm;
using namespace mindcpm::paged;


extern "C" int RopePagedAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *, void *) {
  if (nparam != 10 || !all_fp32(dtypes, {0, 1, 2, 6, 7, 8, 9})) return 1;
  rope_paged_attention(static_cast<const float *>(params[0]), shapes[0][ndims[0] - 1], CacheArgs(params, shapes, 1),
                       static_cast<float *>(params[9]));
  return 0;
}

// The whole attention block of a decoder layer in one op:
//   RmsNormAttentionBlock(x, g, eps, Wqkv, cos, sin, positions, slot_mapping, block_tables, k_cache, v_cache,
//                         meta, Wo, r, scale, y)
//   y = r + scale[0] * attention(rmsnorm(x) Wqkv^T) Wo^T      x, r, y: [B, L, H]
//   Wqkv [(Hq + 2 Hkv) D, H] and Wo [H, Hq D]: fp32 | bf16 | fp16 (the same dtype)
extern "C" int RmsNormAttentionBlock(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *, void *) {
  if (nparam != 16 || !all_fp32(dtypes, {0, 1, 2, 4, 5, 9, 10, 11, 13, 14, 15}) ||
      std::strcmp(dtypes[3], dtypes[12]) != 0)
    return 1;
  const CacheArgs c(params, shapes, 4);
  const int64_t H = shapes[3][1], width = shapes[3][0], M = c.B * c.L, Hq_D = shapes[12][1];
  if (shapes[12][0] != H || width != Hq_D + 2 * c.Hkv * c.D) return 3;
  const float *xn = gemv::rms_normalised(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                                         *static_cast<const float *>(params[2]), M, H);
  thread_local std::vector<float> qkv, attended;  // reused across calls
  qkv.resize(M * width), attended.resize(M * Hq_D);
  if (int err = gemv::dispatch(dtypes[3], xn, params[3], M, H, width, gemv::Plain{qkv.data(), width})) return err;
  rope_paged_attention(qkv.data(), width, c, attended.data());
  gemv::Residual epi{static_cast<float *>(params[15]), H, static_cast<const float *>(params[13]),
                     *static_cast<const float *>(params[14])};
  return gemv::dispatch(dtypes[12], attended.data(), params[12], M, Hq_D, H, epi);
}
