// Tiling of the lightning-attention kernels (MiniMax linear attention, docs/minimax.md#lightning-attention-recurrence, #lightning-block-form),
// plain C++ with no CANN types: op_host's TilingFunc calls it, the tests compile it with g++.
//
// Work unit = one (sequence row, head): its fp32 [D, D] state slot is read and written by exactly
// one vector core. Units are spread over the cores with CoreUnits.
//   decode:  the state streams through UB in tiles of rowsPerTile rows (update, then read).
//   prefill: the state stays in UB; the row's tokens are taken blockLen at a time (the exact
//            block form holds for any block length, so blockLen is whatever fits UB).
#pragma once
#include <cstdint>

#include "tiling_common.h"

namespace lightning_tiling {

using ascendc_hw::AlignUp;
using ascendc_tiling::UbPlan;

struct DecodeTiling {
  int64_t batch, heads, headDim, slots, coreNum, rowsPerTile, stateBuffers;
};

struct PrefillTiling {
  int64_t batch, seqLen, heads, headDim, slots, coreNum, blockLen;
};

// Decay powers lambda^0..lambda^len are kept as one fp32 table.
ASC_DEVICE int64_t PowerTableElems(int64_t len) { return AlignUp(len + 1, 8); }

inline UbPlan DecodePlan(const DecodeTiling &t, int64_t dtypeBytes) {
  const int64_t d = t.headDim;
  UbPlan p;
  p.Add("qkv_in", 1, 3 * d * dtypeBytes);
  p.Add("qkv_f32", 1, 3 * d * 4);
  p.Add("decay", 1, 8 * 4);
  p.Add("state", t.stateBuffers, t.rowsPerTile * d * 4);
  p.Add("out", 1, d * 4);
  return p;
}

inline UbPlan PrefillPlan(const PrefillTiling &t, int64_t dtypeBytes) {
  const int64_t d = t.headDim, m = t.blockLen;
  UbPlan p;
  p.Add("state", 1, d * d * 4);
  p.Add("in", 2, m * d * dtypeBytes);
  p.Add("k_f32", 1, m * d * 4);
  p.Add("v_f32", 1, m * d * 4);
  p.Add("q_f32", 1, d * 4);
  p.Add("prod", 1, d * 4);
  p.Add("powers", 1, PowerTableElems(m) * 4);
  p.Add("dot", 1, 8 * 4);
  p.Add("work", 1, ascendc_hw::ReduceWorkElems(d) * 4);
  p.Add("out", 2, d * 4);
  return p;
}

// Shape checks shared by both: one head per "group", every DataCopy whole 32-byte blocks.
inline const char *CheckShape(int64_t heads, int64_t headDim, int64_t dtypeBytes, int64_t coreNum) {
  if (heads <= 0 || coreNum <= 0) return "empty shape or no cores";
  return ascendc_tiling::CheckHeads(1, 1, headDim, dtypeBytes);
}

// Fills t; returns nullptr, or why the shape cannot run.
inline const char *TileDecode(int64_t batch, int64_t heads, int64_t headDim, int64_t slots, int64_t dtypeBytes,
                              int64_t coreNum, DecodeTiling *t) {
  if (const char *why = CheckShape(heads, headDim, dtypeBytes, coreNum)) return why;
  *t = {batch, heads, headDim, slots, coreNum, headDim, 2};
  // Double-buffered state tiles: the largest power-of-two row count that fits.
  while (DecodePlan(*t, dtypeBytes).Total() > ascendc_hw::kUbBytes && t->rowsPerTile > 1) t->rowsPerTile /= 2;
  if (headDim % t->rowsPerTile || DecodePlan(*t, dtypeBytes).Total() > ascendc_hw::kUbBytes)
    return "head_dim too large for the UB";
  return nullptr;
}

inline const char *TilePrefill(int64_t batch, int64_t seqLen, int64_t heads, int64_t headDim, int64_t slots,
                               int64_t dtypeBytes, int64_t coreNum, PrefillTiling *t) {
  if (const char *why = CheckShape(heads, headDim, dtypeBytes, coreNum)) return why;
  *t = {batch, seqLen, heads, headDim, slots, coreNum, 256};
  while (PrefillPlan(*t, dtypeBytes).Total() > ascendc_hw::kUbBytes && t->blockLen > 8) t->blockLen /= 2;
  if (PrefillPlan(*t, dtypeBytes).Total() > ascendc_hw::kUbBytes) return "head_dim too large for the UB";
  return nullptr;
}

// Block i of a row of n tokens: [i * blockLen, + BlockLen(...)); the kernel's own loop.
ASC_DEVICE int64_t BlockCount(int64_t n, int64_t blockLen) { return ascendc_hw::CeilDiv(n, blockLen); }
ASC_DEVICE int64_t BlockLen(int64_t n, int64_t blockLen, int64_t i) {
  return n - i * blockLen < blockLen ? n - i * blockLen : blockLen;
}

}  // namespace lightning_tiling
