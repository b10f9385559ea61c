// Tiling of the InfLLM-v2 block-sparse attention kernel (docs/minicpm4.md#infllm-v2-block-sparse-attention; the CPU twin is
// ../cpu.cc), plain C++ with no CANN types: op_host's TilingFunc calls it, the tests compile it.
//
// Work unit = one (row, KV head, query) and headsPerUnit of its G query heads: they share every
// selected 64-token block, whose keys and values are read from the paged cache (runs of
// consecutive slots inside a page, one strided DataCopy each) and folded into a running softmax
// per head. When (row, KV head, query) triples are fewer than the cores (batch-1 decode: 2 of
// 48), the group is split over more units: each reads the blocks again, for more cores at work.
#pragma once
#include <cstdint>

#include "tiling_common.h"

namespace infllm_tiling {

constexpr int64_t kSelectBlock = 64;  // tokens per selectable block

struct AttentionTiling {
  int64_t batch, queries, qHeads, kvHeads, headDim, tablePages, pageSize, blocks, coreNum, headsPerUnit;
  float scale;
};

// What unit u computes: query i of row b, query heads [firstHead, + headsPerUnit) of KV head h;
// `row` indexes the selection mask's [B, Hkv, L] rows.
struct AttentionUnit {
  int64_t b, h, i, firstHead, row;
};
ASC_DEVICE AttentionUnit UnitOf(const AttentionTiling &t, int64_t u) {
  const int64_t splits = t.qHeads / t.kvHeads / t.headsPerUnit, row = u / splits;
  const int64_t b = row / (t.kvHeads * t.queries), h = row / t.queries % t.kvHeads, i = row % t.queries;
  return {b, h, i, h * (t.qHeads / t.kvHeads) + u % splits * t.headsPerUnit, row};
}
ASC_DEVICE int64_t UnitCount(const AttentionTiling &t) {
  return t.batch * t.qHeads * t.queries / t.headsPerUnit;
}

inline ascendc_tiling::UbPlan AttentionPlan(const AttentionTiling &t, int64_t dtypeBytes) {
  const int64_t d = t.headDim, g = t.headsPerUnit, n = kSelectBlock;
  ascendc_tiling::UbPlan p;
  p.Add("q_in", 1, g * d * dtypeBytes);
  p.Add("q_f32", 1, g * d * 4);
  p.Add("kv_in", 2, n * d * dtypeBytes);
  p.Add("k_f32", 1, n * d * 4);
  p.Add("v_f32", 1, n * d * 4);
  p.Add("k_cols", 1, n * d * 4);
  p.Add("transpose_offsets", 1, n * d * 4);
  p.Add("acc", 1, g * d * 4);
  p.Add("dot", 1, 8 * 4);
  p.Add("tiny", 1, 8 * 4);
  p.Add("work", 1, ascendc_hw::ReduceWorkElems(d) * 4);
  p.Add("probs", 1, n * 4);
  p.Add("stats", 1, ascendc_hw::AlignUp(2 * g, 8) * 4);
  p.Add("out", 1, g * d * dtypeBytes);
  return p;
}

inline const char *TileAttention(int64_t batch, int64_t queries, int64_t qHeads, int64_t kvHeads, int64_t headDim,
                                 int64_t tablePages, int64_t pageSize, int64_t blocks, int64_t dtypeBytes,
                                 int64_t coreNum, float scale, AttentionTiling *t) {
  if (const char *why = ascendc_tiling::CheckHeads(qHeads, kvHeads, headDim, dtypeBytes)) return why;
  if (pageSize <= 0 || (kvHeads * headDim * dtypeBytes) % ascendc_hw::kBlockBytes) return "bad KV page layout";
  const int64_t group = qHeads / kvHeads, triples = batch * kvHeads * queries;
  int64_t heads = group;  // halve while the units still fit the cores
  while (heads % 2 == 0 && triples * (group / heads) * 2 <= coreNum) heads /= 2;
  *t = {batch, queries, qHeads, kvHeads, headDim, tablePages, pageSize, blocks, coreNum, heads, scale};
  if (AttentionPlan(*t, dtypeBytes).Total() > ascendc_hw::kUbBytes) return "head_dim too large for the UB";
  return nullptr;
}

}  // namespace infllm_tiling
