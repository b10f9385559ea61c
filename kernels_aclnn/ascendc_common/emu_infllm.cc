// Emulation entries of the InfLLM-v2 kernels (see emu_run.h).
#include "emu_run.h"
#include "sparse_attention_kernel.h"
#include "infllm_select_kernel.h"

using namespace emu_run;

namespace {

template <class T>
int InfllmSelectT(int64_t b, int64_t l, int64_t hq, int64_t hkv, int64_t d, int64_t entries, int64_t n1, int64_t n2,
                  int64_t cores, const void *q, const void *c1, const void *c2, const int32_t *positions,
                  const int32_t *c1Table, const int32_t *c2Table, const float *meta, int32_t *selected,
                  int64_t *ubUsed, char *err, int64_t errLen) {
  infllm_tiling::SelectTiling t;
  t.scale = meta[0], t.initBlocks = int64_t(meta[1]), t.windowBlocks = int64_t(meta[2]), t.topk = int64_t(meta[3]);
  t.denseLen = int64_t(meta[4]), t.current = int64_t(meta[5]), t.repeat = meta[6];
  if (const char *why = infllm_tiling::TileSelect(b, l, hq, hkv, d, n1, n2, 2, cores, &t))
    return Report(err, errLen, why, 1);
  infllm_kernel::SelectTensors<EmuLayer, T> g;
  g.q = Gm<T>(q, b * l * hq * d, "q"), g.c1 = Gm<T>(c1, entries * hkv * d, "c1_cache");
  g.c2 = Gm<T>(c2, entries * hkv * d, "c2_cache"), g.positions = Gm<int32_t>(positions, b * l, "positions");
  g.c1Table = Gm<int32_t>(c1Table, b * n1, "c1_table"), g.c2Table = Gm<int32_t>(c2Table, b * n2, "c2_table");
  g.selected = Gm<int32_t>(selected, b * hkv * l * t.blocks, "selected");
  return RunCores<infllm_kernel::BlockSelect<EmuLayer, T>>(t, g, ubUsed, err, errLen);
}

template <class T>
int InfllmAttentionT(int64_t b, int64_t l, int64_t hq, int64_t hkv, int64_t d, int64_t slots, int64_t pages,
                     int64_t pageSize, int64_t blocks, int64_t cores, const void *q, const void *kCache,
                     const void *vCache, const int32_t *positions, const int32_t *tables, const int32_t *selected,
                     const float *scale, void *out, int64_t *ubUsed, char *err, int64_t errLen) {
  infllm_tiling::AttentionTiling t;
  if (const char *why = infllm_tiling::TileAttention(b, l, hq, hkv, d, pages, pageSize, blocks, 2, cores, *scale, &t))
    return Report(err, errLen, why, 1);
  infllm_kernel::AttentionTensors<EmuLayer, T> g;
  g.q = Gm<T>(q, b * l * hq * d, "q"), g.out = Gm<T>(out, b * l * hq * d, "out");
  g.kCache = Gm<T>(kCache, slots * hkv * d, "k_cache"), g.vCache = Gm<T>(vCache, slots * hkv * d, "v_cache");
  g.positions = Gm<int32_t>(positions, b * l, "positions"), g.blockTables = Gm<int32_t>(tables, b * pages, "tables");
  g.selected = Gm<int32_t>(selected, b * hkv * l * blocks, "selected");
  return RunCores<infllm_kernel::SparseAttention<EmuLayer, T>>(t, g, ubUsed, err, errLen);
}

}  // namespace

extern "C" {

// meta: scale, init_blocks, window_blocks, topk, dense_len, current (1 = V-new), repeat, as the CPU kernel's.
int InfllmSelectEmu(int64_t dtype, int64_t b, int64_t l, int64_t hq, int64_t hkv, int64_t d, int64_t entries,
                    int64_t n1, int64_t n2, int64_t cores, const void *q, const void *c1, const void *c2,
                    const int32_t *positions, const int32_t *c1Table, const int32_t *c2Table, const float *meta,
                    int32_t *selected, int64_t *ubUsed, char *err, int64_t errLen) {
  auto run = dtype ? InfllmSelectT<ascendc_emu::bfloat16_t> : InfllmSelectT<ascendc_emu::half>;
  return run(b, l, hq, hkv, d, entries, n1, n2, cores, q, c1, c2, positions, c1Table, c2Table, meta, selected, ubUsed,
             err, errLen);
}

int InfllmAttentionEmu(int64_t dtype, int64_t b, int64_t l, int64_t hq, int64_t hkv, int64_t d, int64_t slots,
                       int64_t pages, int64_t pageSize, int64_t blocks, int64_t cores, const void *q,
                       const void *kCache, const void *vCache, const int32_t *positions, const int32_t *tables,
                       const int32_t *selected, const float *scale, void *out, int64_t *ubUsed, char *err,
                       int64_t errLen) {
  auto run = dtype ? InfllmAttentionT<ascendc_emu::bfloat16_t> : InfllmAttentionT<ascendc_emu::half>;
  return run(b, l, hq, hkv, d, slots, pages, pageSize, blocks, cores, q, kCache, vCache, positions, tables, selected,
             scale, out, ubUsed, err, errLen);
}

}  // extern "C"
