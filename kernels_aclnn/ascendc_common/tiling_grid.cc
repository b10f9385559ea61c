// The tiling grid check (C entry for the tests): every op's tiling over the shapes mindcpm
// serves (head dim 64/128, GQA groups 1-16, contexts up to 128K, batches up to 64, fp16/bf16 -
// both 2 bytes, so one plan), checking what the device would otherwise find out the hard way:
//   - every UB plan fits the 910B's UB;
//   - every DataCopy the kernel issues moves whole 32-byte blocks (lengths and strides);
//   - the work units and tiles cover every output element exactly once.
// Returns the number of shapes checked, or -1 with the first failure in err.
#include <cstring>
#include <string>
#include <vector>

#include "sparse_attention_tiling.h"
#include "infllm_select_tiling.h"
#include "lightning_tiling.h"

namespace {

struct Failure {
  std::string what;
};

void Require(bool ok, const std::string &what) {
  if (!ok) throw Failure{what};
}

std::string Shape(const char *op, std::initializer_list<int64_t> dims) {
  std::string s = op;
  for (int64_t d : dims) s += " " + std::to_string(d);
  return s;
}

void RequirePlan(const ascendc_tiling::UbPlan &plan, const std::string &shape) {
  Require(plan.Total() <= ascendc_hw::kUbBytes, shape + ": UB plan " + std::to_string(plan.Total()) + " B too big");
}

// A strided DataCopy (DataCopyParams): rows and gap in whole 32-byte blocks, every field in range.
void RequireRows(int64_t rows, int64_t rowBytes, int64_t gapBytes, const std::string &shape) {
  Require(ascendc_tiling::Aligned(rowBytes) && ascendc_tiling::Aligned(gapBytes), shape + ": strided copy not whole blocks");
  Require(rows >= 1 && rows <= 4095 && rowBytes / 32 <= 65535 && gapBytes / 32 <= 65535,
          shape + ": DataCopyParams field out of range");
}

// Each unit of `total` is owned by exactly one of `cores` cores.
void RequireUnitCover(int64_t total, int64_t cores, const std::string &shape) {
  std::vector<uint8_t> seen(total, 0);
  for (int64_t c = 0; c < cores; ++c) {
    const auto r = ascendc_tiling::CoreUnits(total, cores, c);
    for (int64_t u = r.begin; u < r.end; ++u) Require(u < total && !seen[u]++, shape + ": unit covered twice");
  }
  for (int64_t u = 0; u < total; ++u) Require(seen[u] == 1, shape + ": unit not covered");
}

// The attention units write every (row, query, query head) output exactly once.
void RequireHeadCover(const infllm_tiling::AttentionTiling &t, const std::string &shape) {
  const int64_t total = infllm_tiling::UnitCount(t);
  RequireUnitCover(total, t.coreNum, shape);
  std::vector<uint8_t> seen(t.batch * t.queries * t.qHeads, 0);
  for (int64_t u = 0; u < total; ++u) {
    const auto unit = infllm_tiling::UnitOf(t, u);
    Require(unit.row == (unit.b * t.kvHeads + unit.h) * t.queries + unit.i, shape + ": wrong selection row");
    for (int64_t g = unit.firstHead; g < unit.firstHead + t.headsPerUnit; ++g) {
      Require(g / (t.qHeads / t.kvHeads) == unit.h, shape + ": a unit's heads leave its KV group");
      Require(!seen[(unit.b * t.queries + unit.i) * t.qHeads + g]++, shape + ": output head written twice");
    }
  }
  for (uint8_t v : seen) Require(v == 1, shape + ": output head not written");
}

const int64_t kHeadDims[] = {64, 128};
const int64_t kBatches[] = {1, 2, 3, 17, 64};
const int64_t kCores[] = {1, 20, 40, 48};

int64_t CheckLightning() {
  using namespace lightning_tiling;
  int64_t shapes = 0;
  for (int64_t d : kHeadDims)
    for (int64_t h : {1, 4, 8, 48, 64})
      for (int64_t b : kBatches)
        for (int64_t cores : kCores) {
          DecodeTiling t{};
          const std::string s = Shape("lightning_decode", {b, h, d, cores});
          Require(TileDecode(b, h, d, 2 * b, 2, cores, &t) == nullptr, s + ": refused");
          RequirePlan(DecodePlan(t, 2), s);
          Require(d % t.rowsPerTile == 0, s + ": state tiles do not cover the rows");
          for (int64_t bytes : {d * 2, t.rowsPerTile * d * 4, d * 4})
            Require(ascendc_tiling::Aligned(bytes), s + ": DataCopy not whole blocks");
          RequireUnitCover(b * h, cores, s);
          ++shapes;
        }
  for (int64_t d : kHeadDims)
    for (int64_t h : {1, 8, 64})
      for (int64_t l : {1, 15, 16, 255, 256, 257, 4096, 131072}) {
        PrefillTiling t{};
        const std::string s = Shape("lightning_prefill", {l, h, d});
        Require(TilePrefill(1, l, h, d, 2, 2, 48, &t) == nullptr, s + ": refused");
        RequirePlan(PrefillPlan(t, 2), s);
        for (int64_t bytes : {d * 2, d * 4, d * d * 4})
          Require(ascendc_tiling::Aligned(bytes), s + ": DataCopy not whole blocks");
        RequireRows(t.blockLen, d * 2, (h - 1) * d * 2, s);
        // Every valid length n of the row: blocks tile [0, n) in order, none longer than blockLen.
        for (int64_t n : {l, l - 1, l / 2})
          if (n > 0) {
            int64_t next = 0;
            for (int64_t i = 0; i < BlockCount(n, t.blockLen); ++i) {
              const int64_t m = BlockLen(n, t.blockLen, i);
              Require(m > 0 && m <= t.blockLen, s + ": blocks do not tile the row");
              next += m;
            }
            Require(next == n, s + ": blocks do not cover the row");
          }
        for (int64_t b : kBatches) RequireUnitCover(b * h, 48, s);
        ++shapes;
      }
  return shapes;
}

// InfLLM-v2 at the served shapes: contexts up to 128K in 16-token pages (NB 64-token blocks,
// N1 = 4 NB - 1 C1 entries, one C2 entry per 64 tokens), top-k 96 (64 + the 32-block window).
int64_t CheckInfllm() {
  using namespace infllm_tiling;
  int64_t shapes = 0;
  for (int64_t d : kHeadDims)
    for (int64_t group : {1, 2, 4, 8, 16})
      for (int64_t hkv : {1, 2, 8})
        for (int64_t context : {1024, 8192, 32768, 131072})
          for (int64_t b : kBatches)
            for (int64_t l : {1, 64, 2048}) {
              if (l > 1 && b > 3) continue;  // long prefill chunks come one row at a time
              const int64_t nb = context / 64, n1 = 4 * nb - 1, n2 = nb - 1;
              const std::string s = Shape("infllm", {d, group, hkv, context, b, l});
              SelectTiling sel{};
              sel.topk = 96, sel.initBlocks = 1, sel.windowBlocks = 32, sel.denseLen = 8192, sel.current = 1;
              Require(TileSelect(b, l, group * hkv, hkv, d, n1, n2, 2, 48, &sel) == nullptr, s + ": select refused");
              RequirePlan(SelectPlan(sel, 2), s + " select");
              Require(sel.chunk > 0 && ascendc_tiling::Aligned(sel.chunk * 4), s + ": score chunks misaligned");
              for (int64_t bytes : {group * d * 2, d * 2}) Require(ascendc_tiling::Aligned(bytes), s + ": select copy");
              AttentionTiling att{};
              for (int64_t page : {16, 64, 128}) {
                Require(TileAttention(b, l, group * hkv, hkv, d, context / page, page, nb, 2, 48, 0.1f, &att) == nullptr,
                        s + ": attention refused");
                RequirePlan(AttentionPlan(att, 2), s + " attention");
                RequireRows(page < kSelectBlock ? page : kSelectBlock, d * 2, (hkv - 1) * d * 2, s + " kv page");
              }
              Require(ascendc_tiling::Aligned(att.headsPerUnit * d * 2), s + ": attention q/out copy");
              if (d == kHeadDims[0] && context == 1024) {  // the unit maps depend on neither
                RequireUnitCover(b * hkv * l, 48, s);       // one selection row per unit
                RequireHeadCover(att, s);
              }
              ++shapes;
            }
  return shapes;
}

}  // namespace

extern "C" int64_t TilingGridCheck(char *err, int64_t errLen) {
  try {
    return CheckLightning() + CheckInfllm();
  } catch (const Failure &f) {
    std::strncpy(err, f.what.c_str(), errLen - 1);
    err[errLen - 1] = 0;
    return -1;
  }
}
