// The emulation's 16-bit rounding, exposed for the tests (see emu_run.h).
#include "emu_layer.h"

extern "C" {

// Rounds n fp32 values to fp16 (dtype 0) or bf16 (1) the way the emulated Cast does.
void NarrowEmu(int64_t dtype, const float *x, uint16_t *out, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = dtype ? ascendc_emu::Narrow<ascendc_emu::bfloat16_t>(x[i]).bits : ascendc_emu::Narrow<ascendc_emu::half>(x[i]).bits;
}

}  // extern "C"
