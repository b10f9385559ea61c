// Small steps the InfLLM kernels share, over the primitive layer L (AscendC or the emulation).
#pragma once
#include <cstdint>

namespace ascendc_helpers {

template <class V>
ASC_DEVICE V Min(V a, V b) { return a < b ? a : b; }
template <class V>
ASC_DEVICE V Max(V a, V b) { return a > b ? a : b; }

// Keys loaded row by row ([n][d], fp32) turned into columns ([d][n]) by one in-UB Gather, so a
// head's scores over n keys are d Axpy of n elements instead of n dot products. The offset table
// is built once per kernel by the scalar unit.
template <class L>
ASC_DEVICE void TransposeOffsets(const typename L::template Local<uint32_t> &offsets, int64_t n, int64_t d) {
  L::VectorToScalar(offsets);
  for (int64_t c = 0; c < d; ++c)
    for (int64_t j = 0; j < n; ++j) offsets.SetValue(c * n + j, uint32_t((j * d + c) * sizeof(float)));
  L::ScalarToVector(offsets);
}

// out[j] = scale * q . k_j for j < n (out holds `width` >= n entries; the rest is scratch), from
// keysT = the keys as columns [d][width]; q is read by the scalar unit (synced by the caller).
template <class L>
ASC_DEVICE void ScaledScores(const typename L::template Local<float> &out, const typename L::template Local<float> &q,
                             const typename L::template Local<float> &keysT, int64_t d, int64_t width, float scale) {
  L::Duplicate(out, 0.f, width);
  for (int64_t c = 0; c < d; ++c) L::Axpy(out, keysT[c * width], q.GetValue(c) * scale, width);
}

// exp(x) for the scalar unit, which has none: one vector Exp on an 8-float scratch.
template <class L>
ASC_DEVICE float ScalarExp(const typename L::template Local<float> &tiny, float x) {
  L::Duplicate(tiny, x, 8);
  L::Exp(tiny, tiny, 8);
  L::VectorToScalar(tiny);
  return tiny.GetValue(0);
}

}  // namespace ascendc_helpers
