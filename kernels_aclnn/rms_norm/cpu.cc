// RMSNorm in fp32: y = x / sqrt(mean(x^2) + eps) * w, one row at a time.
//   RmsNorm(x [..., H] fp32, w [H] fp32, eps [1] fp32, y [..., H] fp32)
#include "../common/cpu_common.h"

using namespace mindcpm;

extern "C" int RmsNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 4) return 1;
  for (int i = 0; i < 4; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) return 2;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float eps = *static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t H = shapes[0][ndims[0] - 1], rows = numel(ndims[0], shapes[0]) / H;
  // Threads only pay off for many rows (prefill); a decode row is a few KiB.
  parallel_chunks(rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm_row(x + r * H, w, eps, H, y + r * H);
  });
  return 0;
}
