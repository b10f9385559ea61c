// Embedding lookup widened to fp32 and scaled: y[t] = table[ids[t]] * scale[0].
//   Embedding(ids [...] int32, table [V, H] fp32 | bf16 | fp16, scale [1] fp32, y [..., H] fp32)
// Out-of-range ids give a zero row (the engine validates ids before they get here).
#include "../common/cpu_common.h"

using namespace mindcpm;

namespace {
template <class W>
void gather(const int32_t *ids, int64_t T, const typename W::T *table, int64_t V, int64_t H, float scale, float *y) {
  for (int64_t t = 0; t < T; ++t) {
    float *yr = y + t * H;
    int64_t id = ids[t];
    if (id < 0 || id >= V) {
      std::memset(yr, 0, H * sizeof(float));
      continue;
    }
    const typename W::T *row = table + id * H;
    for (int64_t i = 0; i < H; ++i) yr[i] = W::get(row + i) * scale;
  }
}
}  // namespace

extern "C" int Embedding(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                         void *) {
  if (nparam != 4 || std::strcmp(dtypes[0], "int32") != 0) return 1;
  // The ids may be the previous step's arg-max, still being written by a task of the kernels' pool
  // (a chained decode step: engine/runner.py _launch_next).
  if (int err = Pool::get().sync()) return err;
  const int32_t *ids = static_cast<const int32_t *>(params[0]);
  const int64_t T = numel(ndims[0], shapes[0]), V = shapes[1][0], H = shapes[1][1];
  const float scale = *static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  switch (weight_type(dtypes[1])) {
    case WType::kF32: gather<F32>(ids, T, static_cast<const float *>(params[1]), V, H, scale, y); return 0;
    case WType::kBF16: gather<BF16>(ids, T, static_cast<const uint16_t *>(params[1]), V, H, scale, y); return 0;
    case WType::kF16: gather<F16>(ids, T, static_cast<const uint16_t *>(params[1]), V, H, scale, y); return 0;
    default: return 2;
  }
}
