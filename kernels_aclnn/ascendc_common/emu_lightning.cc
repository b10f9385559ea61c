// Emulation entries of the lightning-attention kernels (see emu_run.h).
#include "emu_run.h"
#include "lightning_kernels.h"

using namespace emu_run;

namespace {

template <class T>
lightning_kernel::Tensors<EmuLayer, T> LightningTensors(int64_t tokens, int64_t h, int64_t d, int64_t slots,
                                                         int64_t rows, const void *q, const void *k, const void *v,
                                                         const float *slopes, float *pool, const int32_t *stateSlots,
                                                         const int32_t *positions, float *out) {
  lightning_kernel::Tensors<EmuLayer, T> g;
  g.q = Gm<T>(q, tokens * h * d, "q"), g.k = Gm<T>(k, tokens * h * d, "k"), g.v = Gm<T>(v, tokens * h * d, "v");
  g.slopes = Gm<float>(slopes, h, "slopes");
  g.statePool = Gm<float>(pool, slots * h * d * d, "state_pool");
  g.out = Gm<float>(out, tokens * h * d, "out");
  g.slots = Gm<int32_t>(stateSlots, rows, "state_slots");
  g.positions = Gm<int32_t>(positions, tokens, "positions");
  return g;
}

template <class T>
int LightningDecodeT(int64_t b, int64_t h, int64_t d, int64_t slots, int64_t cores, const void *q, const void *k,
                     const void *v, const float *slopes, float *pool, const int32_t *stateSlots,
                     const int32_t *positions, float *out, int64_t *ubUsed, char *err, int64_t errLen) {
  lightning_tiling::DecodeTiling t;
  if (const char *why = lightning_tiling::TileDecode(b, h, d, slots, 2, cores, &t)) return Report(err, errLen, why, 1);
  const auto g = LightningTensors<T>(b, h, d, slots, b, q, k, v, slopes, pool, stateSlots, positions, out);
  return RunCores<lightning_kernel::LightningDecode<EmuLayer, T>>(t, g, ubUsed, err, errLen);
}

template <class T>
int LightningPrefillT(int64_t b, int64_t l, int64_t h, int64_t d, int64_t slots, int64_t cores, const void *q,
                      const void *k, const void *v, const float *slopes, float *pool, const int32_t *stateSlots,
                      const int32_t *positions, float *out, int64_t *ubUsed, char *err, int64_t errLen) {
  lightning_tiling::PrefillTiling t;
  if (const char *why = lightning_tiling::TilePrefill(b, l, h, d, slots, 2, cores, &t))
    return Report(err, errLen, why, 1);
  const auto g = LightningTensors<T>(b * l, h, d, slots, b, q, k, v, slopes, pool, stateSlots, positions, out);
  return RunCores<lightning_kernel::LightningPrefill<EmuLayer, T>>(t, g, ubUsed, err, errLen);
}

}  // namespace

extern "C" {

// dtype: 0 = fp16, 1 = bf16 (q, k, v as their 16-bit patterns).
int LightningDecodeEmu(int64_t dtype, int64_t b, int64_t h, int64_t d, int64_t slots, int64_t cores, const void *q,
                       const void *k, const void *v, const float *slopes, float *pool, const int32_t *stateSlots,
                       const int32_t *positions, float *out, int64_t *ubUsed, char *err, int64_t errLen) {
  auto run = dtype ? LightningDecodeT<ascendc_emu::bfloat16_t> : LightningDecodeT<ascendc_emu::half>;
  return run(b, h, d, slots, cores, q, k, v, slopes, pool, stateSlots, positions, out, ubUsed, err, errLen);
}

int LightningPrefillEmu(int64_t dtype, int64_t b, int64_t l, int64_t h, int64_t d, int64_t slots, int64_t cores,
                        const void *q, const void *k, const void *v, const float *slopes, float *pool,
                        const int32_t *stateSlots, const int32_t *positions, float *out, int64_t *ubUsed, char *err,
                        int64_t errLen) {
  auto run = dtype ? LightningPrefillT<ascendc_emu::bfloat16_t> : LightningPrefillT<ascendc_emu::half>;
  return run(b, l, h, d, slots, cores, q, k, v, slopes, pool, stateSlots, positions, out, ubUsed, err, errLen);
}

}  // extern "C"
