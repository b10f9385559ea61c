// A declarations-only stand-in for CANN's kernel_operator.h, so g++ can check that the device code
// (op_kernel/*.cpp with ascendc_common/ascendc_layer.h) instantiates against the AscendC
// prototypes as the API pages cited in ascendc_layer.h document them: names, argument counts,
// template arguments, const-ness. Nothing here runs and nothing is defined; it proves only that
// our calls match our reading of those pages, not that bisheng accepts them.
#pragma once
#include <cstdint>

#define __aicore__
#define __global__
#define __gm__
using GM_ADDR = uint8_t *;

struct half {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

// GET_TILING_DATA declares a struct generated from op_host's tiling-data class; here one struct
// with every field any of the four ops defines.
struct StubTilingData {
  int64_t batch, heads, headDim, slots, coreNum, rowsPerTile, stateBuffers, seqLen, blockLen, queries, qHeads,
      kvHeads, n1, n2, blocks, chunk, topk, initBlocks, windowBlocks, denseLen, current, tablePages, pageSize,
      headsPerUnit;
  float scale, repeat;
};
StubTilingData StubReadTiling(GM_ADDR);
#define GET_TILING_DATA(var, tiling) const StubTilingData var = StubReadTiling(tiling)

namespace AscendC {

enum class TPosition { GM, VECIN, VECOUT, VECCALC };
enum class HardEvent { MTE2_V, V_MTE2, MTE3_V, V_MTE3, V_S, S_V, S_MTE3, MTE3_MTE2 };
enum class RoundMode { CAST_NONE, CAST_RINT, CAST_FLOOR, CAST_CEIL, CAST_ROUND, CAST_TRUNC, CAST_ODD };
using TEventID = int8_t;

template <class T>
class LocalTensor {
 public:
  LocalTensor operator[](uint32_t offset) const;
  T GetValue(uint32_t index) const;
  void SetValue(uint32_t index, T value) const;
};

template <class T>
class GlobalTensor {
 public:
  void SetGlobalBuffer(__gm__ T *buffer, uint64_t bufferSize);
  GlobalTensor operator[](uint64_t offset) const;
  T GetValue(uint64_t offset) const;
};

template <TPosition pos, int32_t depth>
class TQue {
 public:
  template <class T>
  LocalTensor<T> AllocTensor();
  template <class T>
  bool EnQue(const LocalTensor<T> &tensor);
  template <class T>
  LocalTensor<T> DeQue();
  template <class T>
  void FreeTensor(LocalTensor<T> &tensor);
};

template <TPosition src, TPosition dst, int32_t depth>
class TQueBind : public TQue<src, depth> {};

template <TPosition pos>
class TBuf {
 public:
  template <class T>
  LocalTensor<T> Get();
};

class TPipe {
 public:
  template <TPosition pos, int32_t depth>
  bool InitBuffer(TQue<pos, depth> &que, uint8_t num, uint32_t len);
  template <TPosition pos>
  bool InitBuffer(TBuf<pos> &buf, uint32_t len);
  TEventID FetchEventID(HardEvent evt);
};
int64_t GetBlockIdx();

struct DataCopyParams {
  uint16_t blockCount = 1, blockLen = 0, srcStride = 0, dstStride = 0;
};
struct DataCopyExtParams {
  uint16_t blockCount;
  uint32_t blockLen, srcStride, dstStride, rsv;
};

template <class T>
void DataCopy(const LocalTensor<T> &dst, const GlobalTensor<T> &src, const uint32_t count);
template <class T>
void DataCopy(const LocalTensor<T> &dst, const GlobalTensor<T> &src, const DataCopyParams &params);
template <class T>
void DataCopy(const GlobalTensor<T> &dst, const LocalTensor<T> &src, const uint32_t count);
template <class T>
void DataCopyPad(const GlobalTensor<T> &dst, const LocalTensor<T> &src, const DataCopyExtParams &params);

template <HardEvent event>
void SetFlag(int32_t eventID);
template <HardEvent event>
void WaitFlag(int32_t eventID);

template <class T>
void Duplicate(const LocalTensor<T> &dst, const T &scalar, const int32_t &count);
template <class T>
void Muls(const LocalTensor<T> &dst, const LocalTensor<T> &src, const T &scalar, const int32_t &count);
template <class T>
void Adds(const LocalTensor<T> &dst, const LocalTensor<T> &src, const T &scalar, const int32_t &count);
template <class T>
void Mul(const LocalTensor<T> &dst, const LocalTensor<T> &a, const LocalTensor<T> &b, const int32_t &count);
template <class T>
void Add(const LocalTensor<T> &dst, const LocalTensor<T> &a, const LocalTensor<T> &b, const int32_t &count);
template <class T>
void Max(const LocalTensor<T> &dst, const LocalTensor<T> &a, const LocalTensor<T> &b, const int32_t &count);
template <class T>
void Exp(const LocalTensor<T> &dst, const LocalTensor<T> &src, const int32_t &count);
template <class T, class U>
void Axpy(const LocalTensor<T> &dst, const LocalTensor<U> &src, const U scalar, const int32_t &count);
template <class T, class U>
void Cast(const LocalTensor<T> &dst, const LocalTensor<U> &src, const RoundMode &mode, const uint32_t count);
template <class T>
void Gather(const LocalTensor<T> &dst, const LocalTensor<T> &src, const LocalTensor<uint32_t> &srcOffset,
            const uint32_t srcBaseAddr, const uint32_t count);
template <class T>
void ReduceSum(const LocalTensor<T> &dst, const LocalTensor<T> &src, const LocalTensor<T> &work, const int32_t count);
template <class T>
void ReduceMax(const LocalTensor<T> &dst, const LocalTensor<T> &src, const LocalTensor<T> &work, const int32_t count,
               bool calIndex = false);

}  // namespace AscendC

// Unqualified in the FetchEventID page's example: a global function.
AscendC::TPipe *GetTPipePtr();
