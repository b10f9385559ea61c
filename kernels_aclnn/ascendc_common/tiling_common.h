// Pieces every op's tiling shares: splitting units of work over the vector cores, and the UB
// plan (the buffers a kernel allocates, by name and size) that the tiling checks against the
// 910B's UB and that the CPU emulation compares with what the kernel really allocated.
// Plain C++ with no CANN types: op_host calls it, the tests compile it with g++.
#pragma once
#include <cstdint>
#include "hw_910b.h"

namespace ascendc_tiling {

// Units [begin, end) of core `core` when `total` units are spread over `cores` cores: the first
// total % cores cores take one unit more, so every unit belongs to exactly one core.
struct Range {
  int64_t begin, end;
};
ASC_DEVICE Range CoreUnits(int64_t total, int64_t cores, int64_t core) {
  const int64_t base = total / cores, extra = total % cores;
  const int64_t begin = core * base + (core < extra ? core : extra);
  return {begin, begin + base + (core < extra ? 1 : 0)};
}

// The buffers of one kernel. Every entry is rounded up to the 32-byte block, as TPipe places them.
struct UbPlan {
  static constexpr int kMax = 24;
  const char *names[kMax];
  int64_t bytes[kMax];
  int count = 0;
  void Add(const char *name, int64_t buffers, int64_t bytesEach) {
    names[count] = name;
    bytes[count++] = buffers * ascendc_hw::AlignUp(bytesEach, ascendc_hw::kBlockBytes);
  }
  int64_t Total() const {
    int64_t t = 0;
    for (int i = 0; i < count; ++i) t += bytes[i];
    return t;
  }
};

inline bool Aligned(int64_t bytes) { return bytes % ascendc_hw::kBlockBytes == 0; }

// What every op needs of its heads: 16-bit activations and rows of whole 32-byte blocks, and
// (group > 0) a whole GQA group of at most 16 query heads. nullptr, or why not.
inline const char *CheckHeads(int64_t qHeads, int64_t kvHeads, int64_t headDim, int64_t dtypeBytes) {
  if (kvHeads <= 0 || headDim <= 0) return "empty shape";
  if (qHeads % kvHeads || qHeads / kvHeads > 16) return "query heads per KV head must be 1..16";
  if (dtypeBytes != 2) return "activations must be fp16 or bf16";
  if (headDim * dtypeBytes % ascendc_hw::kBlockBytes) return "head_dim must be a multiple of 16";
  return nullptr;
}

}  // namespace ascendc_tiling
