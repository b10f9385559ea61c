// InfllmSparseAttention on the NPU: sparse_attention_kernel.h's SparseAttention with the AscendC
// layer, one instance per vector core. DTYPE_Q is the activation type CANN's op build defines.
#include "ascendc_layer.h"
#include "sparse_attention_kernel.h"

extern "C" __global__ __aicore__ void infllm_sparse_attention(GM_ADDR q, GM_ADDR kCache, GM_ADDR vCache,
                                                              GM_ADDR positions, GM_ADDR blockTables, GM_ADDR selected,
                                                              GM_ADDR out, GM_ADDR workspace, GM_ADDR tiling) {
  GET_TILING_DATA(d, tiling);
  const infllm_tiling::AttentionTiling t{d.batch,    d.queries, d.qHeads,  d.kvHeads,      d.headDim, d.tablePages,
                                         d.pageSize, d.blocks,  d.coreNum, d.headsPerUnit, d.scale};
  const int64_t elems = t.batch * t.queries * t.qHeads * t.headDim;
  constexpr uint64_t kUnbounded = 1ull << 40;  // the caches are addressed through the block tables
  infllm_kernel::AttentionTensors<ascendc_npu::AscendLayer, DTYPE_Q> g;
  g.q.SetGlobalBuffer((__gm__ DTYPE_Q *)q, elems), g.out.SetGlobalBuffer((__gm__ DTYPE_Q *)out, elems);
  g.kCache.SetGlobalBuffer((__gm__ DTYPE_Q *)kCache, kUnbounded);
  g.vCache.SetGlobalBuffer((__gm__ DTYPE_Q *)vCache, kUnbounded);
  g.positions.SetGlobalBuffer((__gm__ int32_t *)positions, t.batch * t.queries);
  g.blockTables.SetGlobalBuffer((__gm__ int32_t *)blockTables, t.batch * t.tablePages);
  g.selected.SetGlobalBuffer((__gm__ int32_t *)selected, t.batch * t.kvHeads * t.queries * t.blocks);
  AscendC::TPipe pipe;
  infllm_kernel::SparseAttention<ascendc_npu::AscendLayer, DTYPE_Q> kernel;
  kernel.Init(pipe, t, g);
  kernel.Process(AscendC::GetBlockIdx());
}
