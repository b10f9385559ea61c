// Tiling of the InfLLM-v2 block-selection kernel (docs/minicpm4.md#infllm-v2-relevance-scores to #infllm-v2-top-k; the CPU twin is
// ../cpu.cc), plain C++ with no CANN types: op_host's TilingFunc calls it, the tests compile it.
//
// Work unit = one (row, KV head, query): its G query heads are scored against the row's C1 (and
// C2) entries, read C1/C2-table-row by row in chunks of `chunk` entries; the unit writes one row
// [NB] of the selection mask. The whole score row [N1] stays in UB (32 KB at 128K tokens).
#pragma once
#include <cstdint>

#include "tiling_common.h"

namespace infllm_tiling {

using ascendc_hw::AlignUp;

struct SelectTiling {
  int64_t batch, queries, qHeads, kvHeads, headDim, n1, n2, blocks, coreNum, chunk;
  int64_t topk, initBlocks, windowBlocks, denseLen, current;
  float scale, repeat;
};

ASC_DEVICE int64_t Group(const SelectTiling &t) { return t.qHeads / t.kvHeads; }

inline ascendc_tiling::UbPlan SelectPlan(const SelectTiling &t, int64_t dtypeBytes) {
  const int64_t d = t.headDim, g = Group(t), j = t.chunk;
  ascendc_tiling::UbPlan p;
  p.Add("q_in", 1, g * d * dtypeBytes);
  p.Add("q_f32", 1, g * d * 4);
  p.Add("keys_in", 2, j * d * dtypeBytes);
  p.Add("keys_f32", 1, j * d * 4);
  p.Add("k_cols", 1, j * d * 4);
  p.Add("transpose_offsets", 1, j * d * 4);
  p.Add("dot", 1, 8 * 4);
  p.Add("tiny", 1, 8 * 4);
  p.Add("work", 1, ascendc_hw::ReduceWorkElems(d) * 4);
  p.Add("chunk_scores", 1, j * 4);
  p.Add("chunk_sum", 1, j * 4);
  p.Add("norm", 1, AlignUp(2 * g, 8) * 4);
  p.Add("scores", 1, AlignUp(t.n1, 8) * 4);
  p.Add("top_values", 1, AlignUp(t.topk, 8) * 4);
  p.Add("top_blocks", 1, AlignUp(t.topk, 8) * 4);
  p.Add("selected", 1, AlignUp(t.blocks, 8) * 4);
  return p;
}

// Fills t's shape fields; its attributes (topk ... repeat) must be set before, as the UB plan
// depends on topk. Returns nullptr, or why the shape cannot run.
inline const char *TileSelect(int64_t batch, int64_t queries, int64_t qHeads, int64_t kvHeads, int64_t headDim,
                              int64_t n1, int64_t n2, int64_t dtypeBytes, int64_t coreNum, SelectTiling *t) {
  if (const char *why = ascendc_tiling::CheckHeads(qHeads, kvHeads, headDim, dtypeBytes)) return why;
  if ((n1 + 1) % 4) return "the C1 table must hold 4 NB - 1 entries";
  t->batch = batch, t->queries = queries, t->qHeads = qHeads, t->kvHeads = kvHeads, t->headDim = headDim;
  t->n1 = n1, t->n2 = n2, t->blocks = (n1 + 1) / 4, t->coreNum = coreNum, t->chunk = 64;
  while (SelectPlan(*t, dtypeBytes).Total() > ascendc_hw::kUbBytes && t->chunk > 8) t->chunk /= 2;
  if (SelectPlan(*t, dtypeBytes).Total() > ascendc_hw::kUbBytes) return "context too long for the UB";
  return nullptr;
}

}  // namespace infllm_tiling
