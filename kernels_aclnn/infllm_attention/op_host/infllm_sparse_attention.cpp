// CANN glue of InfllmSparseAttention: op definition, shape/dtype inference and the TilingFunc,
// which reads shapes, attributes and the core count and calls the plain-C++ tiling of
// sparse_attention_tiling.h (checked by the tests' tiling grid without CANN).
//   InfllmSparseAttention(q [B, L, Hq, D] fp16|bf16, k_cache, v_cache [S, Hkv, D], positions [B, L] int32,
//                         block_tables [B, P] int32, selected [B, Hkv, L, NB] int32;
//                         attrs scale, page_size) -> out [B, L, Hq*D] (q's dtype)
#include "op_host_common.h"
#include "register/tilingdata_base.h"
#include "sparse_attention_tiling.h"

namespace optiling {

BEGIN_TILING_DATA_DEF(InfllmAttentionTilingData)
TILING_DATA_FIELD_DEF(int64_t, batch);
TILING_DATA_FIELD_DEF(int64_t, queries);
TILING_DATA_FIELD_DEF(int64_t, qHeads);
TILING_DATA_FIELD_DEF(int64_t, kvHeads);
TILING_DATA_FIELD_DEF(int64_t, headDim);
TILING_DATA_FIELD_DEF(int64_t, tablePages);
TILING_DATA_FIELD_DEF(int64_t, pageSize);
TILING_DATA_FIELD_DEF(int64_t, blocks);
TILING_DATA_FIELD_DEF(int64_t, coreNum);
TILING_DATA_FIELD_DEF(int64_t, headsPerUnit);
TILING_DATA_FIELD_DEF(float, scale);
END_TILING_DATA_DEF;
REGISTER_TILING_DATA_CLASS(InfllmSparseAttention, InfllmAttentionTilingData)

static ge::graphStatus AttentionTiling(gert::TilingContext *ctx) {
  const gert::Shape &q = ctx->GetInputShape(0)->GetStorageShape();
  const auto *attrs = ctx->GetAttrs();
  using ascendc_host::InputDim;
  infllm_tiling::AttentionTiling t;
  if (infllm_tiling::TileAttention(q.GetDim(0), q.GetDim(1), q.GetDim(2), InputDim(ctx, 1, 1), q.GetDim(3),
                                   InputDim(ctx, 4, 1), *attrs->GetAttrPointer<int64_t>(1), InputDim(ctx, 5, 3), 2,
                                   ascendc_host::VectorCores(ctx), *attrs->GetAttrPointer<float>(0), &t) != nullptr)
    return ge::GRAPH_FAILED;
  InfllmAttentionTilingData d;
  d.set_batch(t.batch), d.set_queries(t.queries), d.set_qHeads(t.qHeads), d.set_kvHeads(t.kvHeads);
  d.set_headDim(t.headDim), d.set_tablePages(t.tablePages), d.set_pageSize(t.pageSize), d.set_blocks(t.blocks);
  d.set_coreNum(t.coreNum), d.set_headsPerUnit(t.headsPerUnit), d.set_scale(t.scale);
  return ascendc_host::Save(ctx, d, t.coreNum);
}

}  // namespace optiling

namespace ge {

static graphStatus AttentionShape(gert::InferShapeContext *ctx) {  // [B, L, Hq * D]
  const gert::Shape *q = ctx->GetInputShape(0);
  gert::Shape *out = ctx->GetOutputShape(0);
  out->SetDimNum(3);
  out->SetDim(0, q->GetDim(0)), out->SetDim(1, q->GetDim(1)), out->SetDim(2, q->GetDim(2) * q->GetDim(3));
  return GRAPH_SUCCESS;
}

static graphStatus AttentionType(gert::InferDataTypeContext *ctx) {
  ctx->SetOutputDataType(0, ctx->GetInputDataType(0));
  return GRAPH_SUCCESS;
}

}  // namespace ge

namespace ops {

class InfllmSparseAttention : public OpDef {
 public:
  explicit InfllmSparseAttention(const char *name) : OpDef(name) {
    ascendc_host::ActivationInputs(*this, {"q", "k_cache", "v_cache"});
    ascendc_host::FixedInputs(*this, {"positions", "block_tables", "selected"}, ge::DT_INT32);
    Output("out").ParamType(REQUIRED).DataType({ge::DT_FLOAT16, ge::DT_BF16}).Format({ge::FORMAT_ND, ge::FORMAT_ND});
    Attr("scale").Float();
    Attr("page_size").Int();
    SetInferShape(ge::AttentionShape).SetInferDataType(ge::AttentionType);
    AICore().SetTiling(optiling::AttentionTiling).AddConfig("ascend910b");
  }
};
OP_ADD(InfllmSparseAttention);

}  // namespace ops
