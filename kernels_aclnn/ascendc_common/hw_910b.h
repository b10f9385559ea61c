// On-chip sizes and data-movement granules of the Ascend 910B (Atlas A2) AI core, as the tiling
// and the CPU emulation assume them. Plain C++: op_host tiling, the op_kernel code and the
// g++-built emulation all include this one header.
#pragma once
#include <cstdint>

// Functions the device code calls are __aicore__ there (ascendc_layer.h defines this first).
#ifndef ASC_DEVICE
#define ASC_DEVICE inline
#endif

namespace ascendc_hw {

constexpr int64_t kUbBytes = 196608;   // Unified Buffer of one vector core
constexpr int64_t kL1Bytes = 524288;   // L1 of one cube core
constexpr int64_t kL0ABytes = 65536;
constexpr int64_t kL0BBytes = 65536;
constexpr int64_t kL0CBytes = 131072;
constexpr int64_t kBlockBytes = 32;    // DataCopy moves whole 32-byte blocks; UB operands start on one
constexpr int64_t kRepeatBytes = 256;  // one vector instruction repeat
constexpr int64_t kMaxQueueBuffers = 8;

ASC_DEVICE constexpr int64_t AlignUp(int64_t n, int64_t a) { return (n + a - 1) / a * a; }
ASC_DEVICE constexpr int64_t CeilDiv(int64_t n, int64_t d) { return (n + d - 1) / d; }
// fp32 scratch a count-mode ReduceSum/ReduceMax of n fp32 needs: one per 256-byte repeat, whole blocks.
ASC_DEVICE constexpr int64_t ReduceWorkElems(int64_t n) { return AlignUp(CeilDiv(n, kRepeatBytes / 4), 8); }

}  // namespace ascendc_hw
