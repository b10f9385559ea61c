// The primitive layer on the NPU: the same names as emu_layer.h, each a thin call of the AscendC
// API it stands for (Atlas A2 / 910B, vector cores). Only op_kernel/*.cpp include it, built with
// CANN's compiler; nothing here is compiled without CANN (see the README's "verified where").
// The documentation page of every AscendC API used is cited next to its use.
#pragma once
#define ASC_DEVICE __aicore__ inline
#include "kernel_operator.h"

#include "hw_910b.h"

namespace ascendc_npu {

// A TQue / TQueBind typed by its element, so the algorithm says AllocTensor() like the emulation.
// TQue, AllocTensor, EnQue, DeQue, FreeTensor (memory management and synchronisation):
//   https://www.hiascend.com/document/detail/en/canncommercial/800/opdevg/Ascendcopdevg/atlas_ascendc_10_0027.html
// EnQue:  https://www.hiascend.com/document/detail/en/canncommercial/850/API/ascendcopapi/atlasascendc_api_07_0140.html
// DeQue:  https://www.hiascend.com/document/detail/en/canncommercial/850/API/ascendcopapi/atlasascendc_api_07_0141.html
template <class Q, class T>
struct TypedQueue {
  Q q;
  ASC_DEVICE AscendC::LocalTensor<T> AllocTensor() { return q.template AllocTensor<T>(); }
  ASC_DEVICE void EnQue(const AscendC::LocalTensor<T> &t) { q.EnQue(t); }
  ASC_DEVICE AscendC::LocalTensor<T> DeQue() { return q.template DeQue<T>(); }
  ASC_DEVICE void FreeTensor(const AscendC::LocalTensor<T> &t) {
    AscendC::LocalTensor<T> held = t;  // FreeTensor takes a non-const reference
    q.FreeTensor(held);
  }
};

template <AscendC::HardEvent E>
ASC_DEVICE void Flag() {
  // SetFlag/WaitFlag(ISASI), HardEvent:
  //   https://www.hiascend.com/document/detail/en/canncommercial/800/apiref/ascendcopapi/atlasascendc_api_07_0270.html
  // FetchEventID: https://www.hiascend.com/document/detail/zh/canncommercial/800/apiref/ascendcopapi/atlasascendc_api_07_0116.html
  const AscendC::TEventID id = GetTPipePtr()->FetchEventID(E);
  AscendC::SetFlag<E>(id);
  AscendC::WaitFlag<E>(id);
}

struct AscendLayer {
  template <class T>
  using Local = AscendC::LocalTensor<T>;
  template <class T>
  using Global = AscendC::GlobalTensor<T>;
  using Pipe = AscendC::TPipe;
  template <class T>
  using QueIn = TypedQueue<AscendC::TQue<AscendC::TPosition::VECIN, 2>, T>;
  template <class T>
  using QueOut = TypedQueue<AscendC::TQue<AscendC::TPosition::VECOUT, 2>, T>;
  template <class T>
  using QueInOut = TypedQueue<AscendC::TQueBind<AscendC::TPosition::VECIN, AscendC::TPosition::VECOUT, 2>, T>;
  using Half = half;
  using BFloat16 = bfloat16_t;

  // TPipe::InitBuffer places a queue's buffers in UB.
  template <class T>
  ASC_DEVICE static void InitQueue(Pipe &pipe, TypedQueue<AscendC::TQue<AscendC::TPosition::VECIN, 2>, T> &q,
                                   int64_t num, int64_t count, const char *) {
    pipe.InitBuffer(q.q, num, ascendc_hw::AlignUp(count * sizeof(T), ascendc_hw::kBlockBytes));
  }
  template <class T>
  ASC_DEVICE static void InitQueue(Pipe &pipe, TypedQueue<AscendC::TQue<AscendC::TPosition::VECOUT, 2>, T> &q,
                                   int64_t num, int64_t count, const char *) {
    pipe.InitBuffer(q.q, num, ascendc_hw::AlignUp(count * sizeof(T), ascendc_hw::kBlockBytes));
  }
  template <class T>
  ASC_DEVICE static void InitQueue(
      Pipe &pipe,
      TypedQueue<AscendC::TQueBind<AscendC::TPosition::VECIN, AscendC::TPosition::VECOUT, 2>, T> &q, int64_t num,
      int64_t count, const char *) {
    pipe.InitBuffer(q.q, num, ascendc_hw::AlignUp(count * sizeof(T), ascendc_hw::kBlockBytes));
  }

  // Calculation buffers, one TBuf each (TBuf, InitBuffer, Get):
  //   https://www.hiascend.com/document/detail/en/canncommercial/850/API/ascendcopapi/atlasascendc_api_07_0160.html
  struct Arena {
    AscendC::TBuf<AscendC::TPosition::VECCALC> bufs[16];
    int used = 0;
    template <class T>
    ASC_DEVICE Local<T> Get(Pipe &pipe, int64_t count, const char *) {
      pipe.InitBuffer(bufs[used], ascendc_hw::AlignUp(count * sizeof(T), ascendc_hw::kBlockBytes));
      return bufs[used++].template Get<T>();
    }
  };

  // DataCopy GM <-> UB, contiguous (count) and strided (DataCopyParams in 32-byte blocks):
  //   https://www.hiascend.com/document/detail/zh/canncommercial/80RC1/apiref/opdevgapi/atlasascendc_api_07_0110.html
  template <class T>
  ASC_DEVICE static void CopyIn(const Local<T> &dst, const Global<T> &src, int64_t count) {
    AscendC::DataCopy(dst, src, static_cast<uint32_t>(count));
  }
  template <class T>
  ASC_DEVICE static void CopyInRows(const Local<T> &dst, const Global<T> &src, int64_t rows, int64_t cols,
                                    int64_t srcStride) {
    AscendC::DataCopyParams p;
    p.blockCount = static_cast<uint16_t>(rows);
    p.blockLen = static_cast<uint16_t>(cols * sizeof(T) / ascendc_hw::kBlockBytes);
    p.srcStride = static_cast<uint16_t>((srcStride - cols) * sizeof(T) / ascendc_hw::kBlockBytes);
    p.dstStride = 0;
    AscendC::DataCopy(dst, src, p);
  }
  template <class T>
  ASC_DEVICE static void CopyOut(const Global<T> &dst, const Local<T> &src, int64_t count) {
    AscendC::DataCopy(dst, src, static_cast<uint32_t>(count));
  }

  // DataCopyPad UB -> GM (byte-exact length; listed in the AscendC API reference,
  //   https://gitcode.com/cann/asc-devkit/tree/master/docs/zh/api ("DataCopyPad(UB -> GM非对齐数据搬运)")).
  template <class T>
  ASC_DEVICE static void CopyOutPad(const Global<T> &dst, const Local<T> &src, int64_t count) {
    AscendC::DataCopyExtParams p{1, static_cast<uint32_t>(count * sizeof(T)), 0, 0, 0};
    AscendC::DataCopyPad(dst, src, p);
  }

  // Flags between pipes (see Flag above): the event pairs the emulation checks.
  template <class T>
  ASC_DEVICE static void WaitCopyIn(const Local<T> &) { Flag<AscendC::HardEvent::MTE2_V>(); }
  template <class T>
  ASC_DEVICE static void VectorToScalar(const Local<T> &) { Flag<AscendC::HardEvent::V_S>(); }
  template <class T>
  ASC_DEVICE static void VectorToCopyOut(const Local<T> &) { Flag<AscendC::HardEvent::V_MTE3>(); }
  template <class T>
  ASC_DEVICE static void VectorToCopyIn(const Local<T> &) { Flag<AscendC::HardEvent::V_MTE2>(); }
  template <class T>
  ASC_DEVICE static void ScalarToVector(const Local<T> &) { Flag<AscendC::HardEvent::S_V>(); }
  template <class T>
  ASC_DEVICE static void ScalarToCopyOut(const Local<T> &) { Flag<AscendC::HardEvent::S_MTE3>(); }
  template <class T>
  ASC_DEVICE static void CopyOutDone(const Local<T> &) {
    Flag<AscendC::HardEvent::MTE3_MTE2>();
    Flag<AscendC::HardEvent::MTE3_V>();
  }

  // Duplicate: https://asc.gitcode.com/api/SIMD-API/基础API/Memory矢量计算/数据填充/Duplicate.html
  template <class T>
  ASC_DEVICE static void Duplicate(const Local<T> &dst, T value, int64_t n) {
    AscendC::Duplicate(dst, value, static_cast<int32_t>(n));
  }
  // Muls / Adds / Mul / Add / Max: the count-mode elementwise forms of the basic vector API,
  //   https://www.hiascend.com/document/detail/en/canncommercial/800/opdevg/Ascendcopdevg/atlas_ascendc_10_0020.html
  ASC_DEVICE static void Muls(const Local<float> &dst, const Local<float> &src, float s, int64_t n) {
    AscendC::Muls(dst, src, s, static_cast<int32_t>(n));
  }
  ASC_DEVICE static void Adds(const Local<float> &dst, const Local<float> &src, float s, int64_t n) {
    AscendC::Adds(dst, src, s, static_cast<int32_t>(n));
  }
  ASC_DEVICE static void Mul(const Local<float> &dst, const Local<float> &a, const Local<float> &b, int64_t n) {
    AscendC::Mul(dst, a, b, static_cast<int32_t>(n));
  }
  ASC_DEVICE static void Add(const Local<float> &dst, const Local<float> &a, const Local<float> &b, int64_t n) {
    AscendC::Add(dst, a, b, static_cast<int32_t>(n));
  }
  ASC_DEVICE static void Max(const Local<float> &dst, const Local<float> &a, const Local<float> &b, int64_t n) {
    AscendC::Max(dst, a, b, static_cast<int32_t>(n));
  }
  // Exp: https://www.hiascend.com/document/detail/en/canncommercial/850/API/ascendcopapi/atlasascendc_api_07_0023.html
  ASC_DEVICE static void Exp(const Local<float> &dst, const Local<float> &src, int64_t n) {
    AscendC::Exp(dst, src, static_cast<int32_t>(n));
  }
  // Axpy (dst += s * src; the high-level page lists the same precision combinations as the basic one):
  //   https://www.hiascend.com/document/detail/en/canncommercial/850/API/ascendcopapi/atlasascendc_api_07_0585.html
  ASC_DEVICE static void Axpy(const Local<float> &dst, const Local<float> &src, float s, int64_t n) {
    AscendC::Axpy(dst, src, s, static_cast<int32_t>(n));
  }
  // Cast, widening exactly or narrowing with CAST_RINT (round to nearest even):
  //   https://www.hiascend.com/document/detail/en/canncommercial/800/apiref/ascendcopapi/atlasascendc_api_07_0072.html
  template <class D, class S>
  ASC_DEVICE static void Cast(const Local<D> &dst, const Local<S> &src, int64_t n) {
    constexpr AscendC::RoundMode mode =
        sizeof(D) < sizeof(S) ? AscendC::RoundMode::CAST_RINT : AscendC::RoundMode::CAST_NONE;
    AscendC::Cast(dst, src, mode, static_cast<uint32_t>(n));
  }
  // Gather, element-wise by byte offsets into src (count mode; the A2 is listed as supported):
  //   https://gitcode.com/cann/asc-devkit/blob/9.0.0-beta.2/docs/api/context/c_api/vector_compute/asc_gather.md
  template <class T>
  ASC_DEVICE static void Gather(const Local<T> &dst, const Local<T> &src, const Local<uint32_t> &offsets, int64_t n) {
    AscendC::Gather(dst, src, offsets, 0u, static_cast<uint32_t>(n));
  }
  // ReduceSum / ReduceMax, count mode, value only:
  //   https://www.hiascend.com/document/detail/zh/canncommercial/80RC1/apiref/opdevgapi/atlasascendc_api_07_0086.html
  //   https://hiascend.com/document/detail/zh/canncommercial/80RC22/apiref/opdevgapi/atlasascendc_api_07_0085.html
  ASC_DEVICE static void ReduceSum(const Local<float> &dst, const Local<float> &src, const Local<float> &work,
                                   int64_t n) {
    AscendC::ReduceSum(dst, src, work, static_cast<int32_t>(n));
  }
  ASC_DEVICE static void ReduceMax(const Local<float> &dst, const Local<float> &src, const Local<float> &work,
                                   int64_t n) {
    AscendC::ReduceMax(dst, src, work, static_cast<int32_t>(n), false);
  }
};

}  // namespace ascendc_npu
