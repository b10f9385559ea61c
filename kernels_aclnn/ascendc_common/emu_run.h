// Shared by the C entry points of the CPU emulation (emu_*.cc, called by the tests through
// ctypes): each entry runs one AscendC op's shipped algorithm header, instantiated with EmuLayer,
// core by core (a fresh 196,608-byte UB per core), after the op's own tiling. Every entry returns
// 0, or 1 when the tiling refuses the shape, or 2 when the emulation caught a rule violation; the
// message goes to err. Built by tests/ascendc_emu.py (g++, -I ascendc_common and every op_host
// and op_kernel folder, the flat layout of a CANN op project; -DMUTATE_... for mutation builds).
#pragma once
#include <algorithm>
#include <cstring>
#include <string>

#include "emu_layer.h"

namespace emu_run {

using ascendc_emu::EmuLayer;

inline int Report(char *err, int64_t len, const std::string &msg, int code) {
  if (err && len > 0) {
    std::strncpy(err, msg.c_str(), len - 1);
    err[len - 1] = 0;
  }
  return code;
}

template <class E>
inline ascendc_emu::GlobalTensor<E> Gm(const void *p, int64_t n, const char *name) {
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

}  // namespace emu_run
