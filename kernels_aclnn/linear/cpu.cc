// Linear layer y = x W^T for a small number of rows (decode, batched decode): the weight is
// streamed once from memory per block of rows of x, so the kernel runs near memory bandwidth.
//   x: [M, K] fp32   W: [N, K] fp32 | bf16 | fp16 (widened to fp32 in registers)   y: fp32
// Entry points (MindSpore AOT signature, inputs then output):
//   Linear(x, W, y)                       y = x W^T                           y: [M, N]
//   LinearSwiglu(x, W, y)                 W = gate|up (2I rows):
//                                         y = silu(x Wg^T) * (x Wu^T)         y: [M, I]
//   LinearResidual(x, W, r, scale, y)     y = r + scale[0] * x W^T            y: [M, N]
//   RmsNormLinear(x, g, eps, W, y)        y = rmsnorm(x) W^T                  y: [M, N]
//   RmsNormLinearSwiglu(x, g, eps, W, y)  the SwiGLU epilogue on rmsnorm(x)   y: [M, I]
//                                         rmsnorm(x) = x / sqrt(mean(x^2) + eps[0]) * g, fp32
//                                         (the norm before q|k|v and gate|up: one op, not two)
//   RmsNormSwigluMlp(x, g, eps, Wgu, Wd, r, scale, y)
//                                         y = r + scale[0] * swiglu(rmsnorm(x) Wgu^T) Wd^T
//                                         (a whole MLP block, the two GEMVs back to back)
// The GEMV itself is in common/gemv.h.
#include "../common/gemv.h"

using namespace mindcpm;
using namespace mindcpm::gemv;

namespace {

template <class E>
int norm_then(void **params, int *ndims, int64_t **shapes, const char **dtypes, int64_t units_per_row_pair,
              E make_epilogue) {
  for (int i = 0; i < 3; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) return 2;
  int64_t K = shapes[3][1], M = numel(ndims[0], shapes[0]) / K, units = shapes[3][0] / units_per_row_pair;
  const float *xn = rms_normalised(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                                   *static_cast<const float *>(params[2]), M, K);
  return dispatch(dtypes[3], xn, params[3], M, K, units, make_epilogue(static_cast<float *>(params[4]), units));
}

}  // namespace

extern "C" int Linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 3) return 1;
  int64_t K = shapes[1][1], N = shapes[1][0], M = numel(ndims[0], shapes[0]) / K;
  Plain epi{static_cast<float *>(params[2]), N};
  return dispatch(dtypes[1], static_cast<const float *>(params[0]), params[1], M, K, N, epi);
}

extern "C" int LinearSwiglu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                            void *) {
  if (nparam != 3) return 1;
  int64_t K = shapes[1][1], I = shapes[1][0] / 2, M = numel(ndims[0], shapes[0]) / K;
  Swiglu epi{static_cast<float *>(params[2]), I};
  return dispatch(dtypes[1], static_cast<const float *>(params[0]), params[1], M, K, I, epi);
}

extern "C" int LinearResidual(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                              void *) {
  if (nparam != 5) return 1;
  int64_t K = shapes[1][1], N = shapes[1][0], M = numel(ndims[0], shapes[0]) / K;
  Residual epi{static_cast<float *>(params[4]), N, static_cast<const float *>(params[2]),
               *static_cast<const float *>(params[3])};
  return dispatch(dtypes[1], static_cast<const float *>(params[0]), params[1], M, K, N, epi);
}

extern "C" int RmsNormLinear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                             void *) {
  if (nparam != 5) return 1;
  return norm_then(params, ndims, shapes, dtypes, 1, [](float *y, int64_t n) { return Plain{y, n}; });
}

extern "C" int RmsNormLinearSwiglu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *, void *) {
  if (nparam != 5) return 1;
  return norm_then(params, ndims, shapes, dtypes, 2, [](float *y, int64_t n) { return Swiglu{y, n}; });
}

extern "C" int RmsNormSwigluMlp(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                                void *) {
  if (nparam != 8 || std::strcmp(dtypes[3], dtypes[4]) != 0) return 1;
  for (int i : {0, 1, 2, 5, 6})
    if (std::strcmp(dtypes[i], "float32") != 0) return 2;
  int64_t K = shapes[3][1], I = shapes[3][0] / 2, M = numel(ndims[0], shapes[0]) / K;
  if (shapes[4][0] != K || shapes[4][1] != I) return 3;
  const auto *x = static_cast<const float *>(params[0]);
  const float *xn = rms_normalised(x, static_cast<const float *>(params[1]), *static_cast<const float *>(params[2]),
                                   M, K);
  thread_local std::vector<float> hidden;  // the [M, I] SwiGLU activations, reused across calls
  hidden.resize(M * I);
  if (int err = dispatch(dtypes[3], xn, params[3], M, K, I, Swiglu{hidden.data(), I})) return err;
  Residual epi{static_cast<float *>(params[7]), K, static_cast<const float *>(params[5]),
               *static_cast<const float *>(params[6])};
  return dispatch(dtypes[4], hidden.data(), params[4], M, I, K, epi);
}
