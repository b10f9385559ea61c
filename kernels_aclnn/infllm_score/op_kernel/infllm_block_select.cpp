// InfllmBlockSelect on the NPU: infllm_select_kernel.h's BlockSelect with the AscendC layer, one
// instance per vector core. DTYPE_Q is the activation type CANN's op build defines per dtype.
#include "ascendc_layer.h"
#include "infllm_select_kernel.h"

extern "C" __global__ __aicore__ void infllm_block_select(GM_ADDR q, GM_ADDR c1, GM_ADDR c2, GM_ADDR positions,
                                                          GM_ADDR c1Table, GM_ADDR c2Table, GM_ADDR selected,
                                                          GM_ADDR workspace, GM_ADDR tiling) {
  GET_TILING_DATA(d, tiling);
  infllm_tiling::SelectTiling t{d.batch,  d.queries, d.qHeads,     d.kvHeads,      d.headDim,  d.n1,
                                d.n2,     d.blocks,  d.coreNum,    d.chunk,        d.topk,     d.initBlocks,
                                d.windowBlocks, d.denseLen, d.current, d.scale, d.repeat};
  // Entry counts are not known here; the cache tensors are addressed through the tables.
  constexpr uint64_t kUnbounded = 1ull << 40;
  infllm_kernel::SelectTensors<ascendc_npu::AscendLayer, DTYPE_Q> g;
  g.q.SetGlobalBuffer((__gm__ DTYPE_Q *)q, t.batch * t.queries * t.qHeads * t.headDim);
  g.c1.SetGlobalBuffer((__gm__ DTYPE_Q *)c1, kUnbounded), g.c2.SetGlobalBuffer((__gm__ DTYPE_Q *)c2, kUnbounded);
  g.positions.SetGlobalBuffer((__gm__ int32_t *)positions, t.batch * t.queries);
  g.c1Table.SetGlobalBuffer((__gm__ int32_t *)c1Table, t.batch * t.n1);
  g.c2Table.SetGlobalBuffer((__gm__ int32_t *)c2Table, t.batch * t.n2);
  g.selected.SetGlobalBuffer((__gm__ int32_t *)selected, t.batch * t.kvHeads * t.queries * t.blocks);
  AscendC::TPipe pipe;
  infllm_kernel::BlockSelect<ascendc_npu::AscendLayer, DTYPE_Q> kernel;
  kernel.Init(pipe, t, g);
  kernel.Process(AscendC::GetBlockIdx());
}
