// LightningPrefill on the NPU: lightning_kernels.h's LightningPrefill with the AscendC layer, one
// instance per vector core. DTYPE_Q is the activation type CANN's op build defines per dtype.
#include "ascendc_layer.h"
#include "lightning_kernels.h"

extern "C" __global__ __aicore__ void lightning_prefill(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR slopes,
                                                        GM_ADDR statePool, GM_ADDR stateSlots, GM_ADDR positions,
                                                        GM_ADDR o, GM_ADDR workspace, GM_ADDR tiling) {
  GET_TILING_DATA(data, tiling);
  const lightning_tiling::PrefillTiling t{data.batch, data.seqLen, data.heads, data.headDim,
                                          data.slots, data.coreNum, data.blockLen};
  const int64_t tokens = t.batch * t.seqLen, elems = tokens * t.heads * t.headDim;
  lightning_kernel::Tensors<ascendc_npu::AscendLayer, DTYPE_Q> g;
  g.q.SetGlobalBuffer((__gm__ DTYPE_Q *)q, elems), g.k.SetGlobalBuffer((__gm__ DTYPE_Q *)k, elems);
  g.v.SetGlobalBuffer((__gm__ DTYPE_Q *)v, elems), g.slopes.SetGlobalBuffer((__gm__ float *)slopes, t.heads);
  g.statePool.SetGlobalBuffer((__gm__ float *)statePool, t.slots * t.heads * t.headDim * t.headDim);
  g.out.SetGlobalBuffer((__gm__ float *)o, elems);
  g.slots.SetGlobalBuffer((__gm__ int32_t *)stateSlots, t.batch);
  g.positions.SetGlobalBuffer((__gm__ int32_t *)positions, tokens);
  AscendC::TPipe pipe;
  lightning_kernel::LightningPrefill<ascendc_npu::AscendLayer, DTYPE_Q> kernel;
  kernel.Init(pipe, t, g);
  kernel.Process(AscendC::GetBlockIdx());
}
