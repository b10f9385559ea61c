// CANN glue of InfllmBlockSelect: op definition, shape/dtype inference and the TilingFunc, which
// reads shapes, attributes and the core count and calls the plain-C++ tiling of
// infllm_select_tiling.h (checked by the tests' tiling grid without CANN).
//   InfllmBlockSelect(q [B, L, Hq, D] fp16|bf16, c1_cache, c2_cache [E, Hkv, D], positions [B, L] int32,
//                     c1_table [B, N1] int32, c2_table [B, N2] int32;
//                     attrs scale, init_blocks, window_blocks, topk, dense_len, current, repeat)
//                     -> selected [B, Hkv, L, (N1 + 1) / 4] int32
#include "infllm_select_tiling.h"
#include "op_host_common.h"
#include "register/tilingdata_base.h"

namespace optiling {

BEGIN_TILING_DATA_DEF(InfllmSelectTilingData)
TILING_DATA_FIELD_DEF(int64_t, batch);
TILING_DATA_FIELD_DEF(int64_t, queries);
TILING_DATA_FIELD_DEF(int64_t, qHeads);
TILING_DATA_FIELD_DEF(int64_t, kvHeads);
TILING_DATA_FIELD_DEF(int64_t, headDim);
TILING_DATA_FIELD_DEF(int64_t, n1);
TILING_DATA_FIELD_DEF(int64_t, n2);
TILING_DATA_FIELD_DEF(int64_t, blocks);
TILING_DATA_FIELD_DEF(int64_t, coreNum);
TILING_DATA_FIELD_DEF(int64_t, chunk);
TILING_DATA_FIELD_DEF(int64_t, topk);
TILING_DATA_FIELD_DEF(int64_t, initBlocks);
TILING_DATA_FIELD_DEF(int64_t, windowBlocks);
TILING_DATA_FIELD_DEF(int64_t, denseLen);
TILING_DATA_FIELD_DEF(int64_t, current);
TILING_DATA_FIELD_DEF(float, scale);
TILING_DATA_FIELD_DEF(float, repeat);
END_TILING_DATA_DEF;
REGISTER_TILING_DATA_CLASS(InfllmBlockSelect, InfllmSelectTilingData)

static ge::graphStatus SelectTiling(gert::TilingContext *ctx) {
  const gert::Shape &q = ctx->GetInputShape(0)->GetStorageShape();
  const auto *attrs = ctx->GetAttrs();
  infllm_tiling::SelectTiling t{};
  t.scale = *attrs->GetAttrPointer<float>(0), t.initBlocks = *attrs->GetAttrPointer<int64_t>(1);
  t.windowBlocks = *attrs->GetAttrPointer<int64_t>(2), t.topk = *attrs->GetAttrPointer<int64_t>(3);
  t.denseLen = *attrs->GetAttrPointer<int64_t>(4), t.current = *attrs->GetAttrPointer<int64_t>(5);
  t.repeat = *attrs->GetAttrPointer<float>(6);
  using ascendc_host::InputDim;
  if (infllm_tiling::TileSelect(q.GetDim(0), q.GetDim(1), q.GetDim(2), InputDim(ctx, 1, 1), q.GetDim(3),
                                InputDim(ctx, 4, 1), InputDim(ctx, 5, 1), 2, ascendc_host::VectorCores(ctx), &t) != nullptr)
    return ge::GRAPH_FAILED;
  InfllmSelectTilingData d;
  d.set_batch(t.batch), d.set_queries(t.queries), d.set_qHeads(t.qHeads), d.set_kvHeads(t.kvHeads);
  d.set_headDim(t.headDim), d.set_n1(t.n1), d.set_n2(t.n2), d.set_blocks(t.blocks), d.set_coreNum(t.coreNum);
  d.set_chunk(t.chunk), d.set_topk(t.topk), d.set_initBlocks(t.initBlocks), d.set_windowBlocks(t.windowBlocks);
  d.set_denseLen(t.denseLen), d.set_current(t.current), d.set_scale(t.scale), d.set_repeat(t.repeat);
  return ascendc_host::Save(ctx, d, t.coreNum);
}

}  // namespace optiling

namespace ge {

static graphStatus SelectShape(gert::InferShapeContext *ctx) {  // [B, Hkv, L, NB]
  const gert::Shape *q = ctx->GetInputShape(0), *c1 = ctx->GetInputShape(1), *t1 = ctx->GetInputShape(4);
  gert::Shape *out = ctx->GetOutputShape(0);
  out->SetDimNum(4);
  out->SetDim(0, q->GetDim(0)), out->SetDim(1, c1->GetDim(1)), out->SetDim(2, q->GetDim(1));
  out->SetDim(3, (t1->GetDim(1) + 1) / 4);
  return GRAPH_SUCCESS;
}

static graphStatus SelectType(gert::InferDataTypeContext *ctx) {
  ctx->SetOutputDataType(0, DT_INT32);
  return GRAPH_SUCCESS;
}

}  // namespace ge

namespace ops {

class InfllmBlockSelect : public OpDef {
 public:
  explicit InfllmBlockSelect(const char *name) : OpDef(name) {
    ascendc_host::ActivationInputs(*this, {"q", "c1_cache", "c2_cache"});
    ascendc_host::FixedInputs(*this, {"positions", "c1_table", "c2_table"}, ge::DT_INT32);
    Output("selected").ParamType(REQUIRED).DataType({ge::DT_INT32, ge::DT_INT32}).Format({ge::FORMAT_ND, ge::FORMAT_ND});
    Attr("scale").Float();
    Attr("init_blocks").Int();
    Attr("window_blocks").Int();
    Attr("topk").Int();
    Attr("dense_len").Int();
    Attr("current").Int();
    Attr("repeat").Float();
    SetInferShape(ge::SelectShape).SetInferDataType(ge::SelectType);
    AICore().SetTiling(optiling::SelectTiling).AddConfig("ascend910b");
  }
};
OP_ADD(InfllmBlockSelect);

}  // namespace ops
