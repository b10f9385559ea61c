// The emulated AscendC ops as MindSpore CPU "aot" custom ops (the signature of ops.Custom's aot
// functions), so that a test can put them in the ascend Device's graphs in place of the built
// ops (tests/ascendc_standins.py). Each forwards to its emulation entry (emu_lightning.cc,
// emu_infllm.cc), which runs the shipped kernel header core by core; state_pool is updated in
// place, as on the device. The ops' attributes arrive as one trailing fp32 input, in the order of
// the op's Attr list (op_host/*.cpp). A refused shape or a violated AscendC rule is printed and
// fails the op (non-zero return: MindSpore raises).
#include <cstdint>
#include <cstdio>
#include <cstring>

extern "C" {
int LightningDecodeEmu(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const void *, const void *,
                       const void *, const float *, float *, const int32_t *, const int32_t *, float *, int64_t *,
                       char *, int64_t);
int LightningPrefillEmu(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const void *, const void *,
                        const void *, const float *, float *, const int32_t *, const int32_t *, float *, int64_t *,
                        char *, int64_t);
int InfllmSelectEmu(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                    const void *, const void *, const void *, const int32_t *, const int32_t *, const int32_t *,
                    const float *, int32_t *, int64_t *, char *, int64_t);
int InfllmAttentionEmu(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, const void *, const void *, const void *, const int32_t *, const int32_t *,
                       const int32_t *, const float *, void *, int64_t *, char *, int64_t);
}

namespace {

constexpr int64_t kCores = 48;  // the 910B's vector cores: the tiling splits over them as on the device

// 0 = fp16, 1 = bf16, -1 = anything else (the ops take no other activation dtype).
int ActivationType(const char *dtype) {
  if (std::strcmp(dtype, "float16") == 0) return 0;
  if (std::strcmp(dtype, "bfloat16") == 0) return 1;
  return -1;
}

// Checks the call, then runs entry(dtype, ubUsed, err, errLen) and reports its failure.
template <class Entry>
int Run(const char *op, int nparam, const char *dtype, Entry entry) {
  const int t = ActivationType(dtype);
  if (nparam != 8 || t < 0) return 1;
  int64_t used = 0;
  char err[512] = {0};
  const int code = entry(t, &used, err, int64_t(sizeof(err)));
  if (code) std::fprintf(stderr, "%s (AscendC emulation): %s\n", op, err);
  return code;
}

}  // namespace

extern "C" {

// q, k, v [B, H, D]; slopes; state_pool [S, H, D, D]; state_slots [B]; positions [B] -> o [B, H*D].
int LightningDecodeAot(int nparam, void **p, int *, int64_t **shapes, const char **dtypes, void *, void *) {
  return Run("LightningDecode", nparam, dtypes[0], [&](int t, int64_t *used, char *err, int64_t len) {
    return LightningDecodeEmu(t, shapes[0][0], shapes[0][1], shapes[0][2], shapes[4][0], kCores, p[0], p[1], p[2],
                              static_cast<float *>(p[3]), static_cast<float *>(p[4]), static_cast<int32_t *>(p[5]),
                              static_cast<int32_t *>(p[6]), static_cast<float *>(p[7]), used, err, len);
  });
}

// q, k, v [B, L, H, D]; slopes; state_pool; state_slots [B]; positions [B, L] -> o [B, L, H*D].
int LightningPrefillAot(int nparam, void **p, int *, int64_t **shapes, const char **dtypes, void *, void *) {
  return Run("LightningPrefill", nparam, dtypes[0], [&](int t, int64_t *used, char *err, int64_t len) {
    return LightningPrefillEmu(t, shapes[0][0], shapes[0][1], shapes[0][2], shapes[0][3], shapes[4][0], kCores, p[0],
                               p[1], p[2], static_cast<float *>(p[3]), static_cast<float *>(p[4]),
                               static_cast<int32_t *>(p[5]), static_cast<int32_t *>(p[6]), static_cast<float *>(p[7]),
                               used, err, len);
  });
}

// q [B, L, Hq, D]; c1, c2 [E, Hkv, D]; positions [B, L]; c1_table [B, N1]; c2_table [B, N2];
// attrs [7] (scale, init_blocks, window_blocks, topk, dense_len, current, repeat) -> selected.
int InfllmBlockSelectAot(int nparam, void **p, int *, int64_t **shapes, const char **dtypes, void *, void *) {
  return Run("InfllmBlockSelect", nparam, dtypes[0], [&](int t, int64_t *used, char *err, int64_t len) {
    return InfllmSelectEmu(t, shapes[0][0], shapes[0][1], shapes[0][2], shapes[1][1], shapes[0][3], shapes[1][0],
                           shapes[4][1], shapes[5][1], kCores, p[0], p[1], p[2], static_cast<int32_t *>(p[3]),
                           static_cast<int32_t *>(p[4]), static_cast<int32_t *>(p[5]), static_cast<float *>(p[6]),
                           static_cast<int32_t *>(p[7]), used, err, len);
  });
}

// q [B, L, Hq, D]; k/v caches [S, Hkv, D]; positions [B, L]; block_tables [B, P]; selected
// [B, Hkv, L, NB]; attrs [2] (scale, page_size) -> out [B, L, Hq*D] in q's dtype.
int InfllmSparseAttentionAot(int nparam, void **p, int *, int64_t **shapes, const char **dtypes, void *, void *) {
  return Run("InfllmSparseAttention", nparam, dtypes[0], [&](int t, int64_t *used, char *err, int64_t len) {
    const float *attrs = static_cast<float *>(p[6]);
    return InfllmAttentionEmu(t, shapes[0][0], shapes[0][1], shapes[0][2], shapes[1][1], shapes[0][3], shapes[1][0],
                              shapes[4][1], int64_t(attrs[1]), shapes[5][3], kCores, p[0], p[1], p[2],
                              static_cast<int32_t *>(p[3]), static_cast<int32_t *>(p[4]), static_cast<int32_t *>(p[5]),
                              attrs, p[7], used, err, len);
  });
}

}  // extern "C"
