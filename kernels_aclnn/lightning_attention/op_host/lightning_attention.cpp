// CANN glue of LightningDecode and LightningPrefill: op definitions, shape/dtype inference and the
// TilingFunc, which only reads shapes and the core count and calls the plain-C++ tiling of
// lightning_tiling.h (checked by tests/ops/test_ascendc_lightning.py's grid without CANN).
//
//   LightningDecode(q, k, v [B, H, D] fp16|bf16, slopes [H] fp32, state_pool [S, H, D, D] fp32,
//                   state_slots [B] int32, positions [B] int32) -> o [B, H*D] fp32
//   LightningPrefill(q, k, v [B, L, H, D], slopes, state_pool, state_slots [B], positions [B, L])
//                   -> o [B, L, H*D] fp32
// state_pool is updated in place (the slots of the rows; -1 = padding row).
#include "lightning_tiling.h"
#include "lightning_tiling_data.h"
#include "op_host_common.h"

namespace optiling {

using ascendc_host::InputDim;
using ascendc_host::VectorCores;

static ge::graphStatus DecodeTiling(gert::TilingContext *ctx) {
  lightning_tiling::DecodeTiling t;
  if (lightning_tiling::TileDecode(InputDim(ctx, 0, 0), InputDim(ctx, 0, 1), InputDim(ctx, 0, 2), InputDim(ctx, 4, 0), 2,
                                   VectorCores(ctx), &t) != nullptr)
    return ge::GRAPH_FAILED;
  LightningDecodeTilingData data;
  data.set_batch(t.batch), data.set_heads(t.heads), data.set_headDim(t.headDim), data.set_slots(t.slots);
  data.set_coreNum(t.coreNum), data.set_rowsPerTile(t.rowsPerTile), data.set_stateBuffers(t.stateBuffers);
  return ascendc_host::Save(ctx, data, t.coreNum);
}

static ge::graphStatus PrefillTiling(gert::TilingContext *ctx) {
  lightning_tiling::PrefillTiling t;
  if (lightning_tiling::TilePrefill(InputDim(ctx, 0, 0), InputDim(ctx, 0, 1), InputDim(ctx, 0, 2), InputDim(ctx, 0, 3), InputDim(ctx, 4, 0),
                                    2, VectorCores(ctx), &t) != nullptr)
    return ge::GRAPH_FAILED;
  LightningPrefillTilingData data;
  data.set_batch(t.batch), data.set_seqLen(t.seqLen), data.set_heads(t.heads), data.set_headDim(t.headDim);
  data.set_slots(t.slots), data.set_coreNum(t.coreNum), data.set_blockLen(t.blockLen);
  return ascendc_host::Save(ctx, data, t.coreNum);
}

}  // namespace optiling

namespace ge {

// o: the query's shape with the last two dims (H, D) merged.
static graphStatus InferShape(gert::InferShapeContext *ctx) {
  const gert::Shape *q = ctx->GetInputShape(0);
  gert::Shape *o = ctx->GetOutputShape(0);
  const size_t rank = q->GetDimNum();
  o->SetDimNum(rank - 1);
  for (size_t i = 0; i + 2 < rank; ++i) o->SetDim(i, q->GetDim(i));
  o->SetDim(rank - 2, q->GetDim(rank - 2) * q->GetDim(rank - 1));
  return GRAPH_SUCCESS;
}

static graphStatus InferDataType(gert::InferDataTypeContext *ctx) {
  ctx->SetOutputDataType(0, DT_FLOAT);
  return GRAPH_SUCCESS;
}

}  // namespace ge

namespace ops {

// Both ops take the same inputs; only the ranks and the tiling differ.
static void DefineLightning(OpDef &op, gert::OpImplRegisterV2::TilingKernelFunc tiling) {
  ascendc_host::ActivationInputs(op, {"q", "k", "v"});
  ascendc_host::FixedInputs(op, {"slopes", "state_pool"}, ge::DT_FLOAT);
  ascendc_host::FixedInputs(op, {"state_slots", "positions"}, ge::DT_INT32);
  op.Output("o").ParamType(REQUIRED).DataType({ge::DT_FLOAT, ge::DT_FLOAT}).Format({ge::FORMAT_ND, ge::FORMAT_ND});
  op.SetInferShape(ge::InferShape).SetInferDataType(ge::InferDataType);
  op.AICore().SetTiling(tiling).AddConfig("ascend910b");
}

class LightningDecode : public OpDef {
 public:
  explicit LightningDecode(const char *name) : OpDef(name) { DefineLightning(*this, optiling::DecodeTiling); }
};
class LightningPrefill : public OpDef {
 public:
  explicit LightningPrefill(const char *name) : OpDef(name) { DefineLightning(*this, optiling::PrefillTiling); }
};
OP_ADD(LightningDecode);
OP_ADD(LightningPrefill);

}  // namespace ops
