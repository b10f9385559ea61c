// CANN op_host glue the ops share (compiled only with CANN, through build_npu.sh's staging):
// declaring inputs of the activation and index dtypes, the vector-core count, and saving a
// tiling-data object with the launch's block count.
#pragma once
#include <initializer_list>

#include "register/op_def_registry.h"
#include "tiling/platform/platform_ascendc.h"

namespace ascendc_host {

// Inputs in the activation dtype: one kernel per dtype, fp16 and bf16 (DTYPE_<input> in the kernel).
inline void ActivationInputs(ops::OpDef &op, std::initializer_list<const char *> names) {
  for (const char *n : names)
    op.Input(n).ParamType(ops::REQUIRED).DataType({ge::DT_FLOAT16, ge::DT_BF16}).Format({ge::FORMAT_ND, ge::FORMAT_ND});
}

// Inputs of one dtype in both kernels (int32 indices, fp32 states).
inline void FixedInputs(ops::OpDef &op, std::initializer_list<const char *> names, ge::DataType type) {
  for (const char *n : names) op.Input(n).ParamType(ops::REQUIRED).DataType({type, type}).Format({ge::FORMAT_ND, ge::FORMAT_ND});
}

inline int64_t VectorCores(gert::TilingContext *ctx) {
  return platform_ascendc::PlatformAscendC(ctx->GetPlatformInfo()).GetCoreNumAiv();
}

inline int64_t InputDim(gert::TilingContext *ctx, int input, int axis) {
  return ctx->GetInputShape(input)->GetStorageShape().GetDim(axis);
}

template <class TilingData>
ge::graphStatus Save(gert::TilingContext *ctx, TilingData &data, int64_t cores) {
  data.SaveToBuffer(ctx->GetRawTilingData()->GetData(), ctx->GetRawTilingData()->GetCapacity());
  ctx->GetRawTilingData()->SetDataSize(data.GetDataSize());
  ctx->SetBlockDim(cores);
  return ge::GRAPH_SUCCESS;
}

}  // namespace ascendc_host
