// Small steps the InfLLM kernels share, over the primitive layer L (AscendC or the emulation).
#pragma once
#include <cstdint>

namespace ascendc_helpers {

template <class V>
ASC_DEVICE V Min(V a, V b) { return a < b ? a : b; }
template <class V>
ASC_DEVICE V Max(V a, V b) { return a > b ? a : b; }

// out[j] = scale * q . keys[j d .. j d + d) for j < m: one Mul + ReduceSum per key, the results
// gathered by the scalar unit (out is handed back to the vector unit before returning).
template <class L>
ASC_DEVICE void ScaledDots(const typename L::template Local<float> &out, const typename L::template Local<float> &q,
                           const typename L::template Local<float> &keys, const typename L::template Local<float> &prod,
                           const typename L::template Local<float> &dot, const typename L::template Local<float> &work,
                           int64_t d, int64_t m, float scale) {
  L::VectorToScalar(out);
  for (int64_t j = 0; j < m; ++j) {
    L::Mul(prod, q, keys[j * d], d);
    L::ReduceSum(dot, prod, work, d);
    L::VectorToScalar(dot);
    out.SetValue(j, dot.GetValue(0) * scale);
  }
  L::ScalarToVector(out);
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
