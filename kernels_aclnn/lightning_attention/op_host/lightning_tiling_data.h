// CANN tiling-data classes of the two lightning ops: the fields of lightning_tiling.h's plain
// structs, which op_host's TilingFunc copies over and the kernels read back with GET_TILING_DATA.
#pragma once
#include "register/tilingdata_base.h"

namespace optiling {

BEGIN_TILING_DATA_DEF(LightningDecodeTilingData)
TILING_DATA_FIELD_DEF(int64_t, batch);
TILING_DATA_FIELD_DEF(int64_t, heads);
TILING_DATA_FIELD_DEF(int64_t, headDim);
TILING_DATA_FIELD_DEF(int64_t, slots);
TILING_DATA_FIELD_DEF(int64_t, coreNum);
TILING_DATA_FIELD_DEF(int64_t, rowsPerTile);
TILING_DATA_FIELD_DEF(int64_t, stateBuffers);
END_TILING_DATA_DEF;
REGISTER_TILING_DATA_CLASS(LightningDecode, LightningDecodeTilingData)

BEGIN_TILING_DATA_DEF(LightningPrefillTilingData)
TILING_DATA_FIELD_DEF(int64_t, batch);
TILING_DATA_FIELD_DEF(int64_t, seqLen);
TILING_DATA_FIELD_DEF(int64_t, heads);
TILING_DATA_FIELD_DEF(int64_t, headDim);
TILING_DATA_FIELD_DEF(int64_t, slots);
TILING_DATA_FIELD_DEF(int64_t, coreNum);
TILING_DATA_FIELD_DEF(int64_t, blockLen);
END_TILING_DATA_DEF;
REGISTER_TILING_DATA_CLASS(LightningPrefill, LightningPrefillTilingData)

}  // namespace optiling
