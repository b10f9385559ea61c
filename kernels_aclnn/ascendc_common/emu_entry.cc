// C entry points of the CPU emulation, for the tests (ctypes): each runs one AscendC op's shipped
// algorithm header, instantiated with EmuLayer, core by core (a fresh 196,608-byte UB per core),
// after the op's own tiling. Build: g++ -O2 -std=c++17 -shared -fPIC emu_entry.cc tiling_grid.cc
// [-DMUTATE_...]. Every function returns 0, or 1 when the tiling refuses the shape, or 2 when the
// emulation caught a rule violation; the message goes to err.
#include <algorithm>
#include <cstring>
#include <string>

#include "emu_layer.h"
#include "../lightning_attention/op_kernel/lightning_kernels.h"

using ascendc_emu::EmuLayer;

namespace {

int Report(char *err, int64_t len, const std::string &msg, int code) {
  if (err && len > 0) {
    std::strncpy(err, msg.c_str(), len - 1);
    err[len - 1] = 0;
  }
  return code;
}

template <class E>
ascendc_emu::GlobalTensor<E> Gm(const void *p, int64_t n, const char *name) {
  ascendc_emu::GlobalTensor<E> g;
  g.SetGlobalBuffer(static_cast<E *>(const_cast<void *>(p)), n, name);
  return g;
}

// Runs kernel K on every core of tiling t; *ubUsed = the largest UB any core placed.
template <class K, class Tiling, class Args>
int RunCores(const Tiling &t, const Args &g, int64_t *ubUsed, char *err, int64_t errLen) {
  try {
    for (int64_t core = 0; core < t.coreNum; ++core) {
      ascendc_emu::TPipe pipe;
      K kernel;
      kernel.Init(pipe, t, g);
      kernel.Process(core);
      kernel.ForEachQueue([](auto &q) { q.CheckIdle(); });
      *ubUsed = std::max(*ubUsed, pipe.Used());
    }
  } catch (const ascendc_emu::Violation &v) {
    return Report(err, errLen, v.what(), 2);
  }
  return 0;
}

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

// Rounds n fp32 values to fp16 (dtype 0) or bf16 (1) the way the emulated Cast does.
void NarrowEmu(int64_t dtype, const float *x, uint16_t *out, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = dtype ? ascendc_emu::Narrow<ascendc_emu::bfloat16_t>(x[i]).bits : ascendc_emu::Narrow<ascendc_emu::half>(x[i]).bits;
}

}  // extern "C"
