// CPU emulation of the AscendC primitive layer (the twin of ascendc_layer.h), compiled with g++.
// The kernels' algorithm headers are instantiated with it in the tests, so the code that ships
// to the NPU is what runs here. It computes like the vector unit (fp32 arithmetic, 16-bit casts
// rounded to nearest even as CAST_RINT) and refuses what AscendC forbids, by throwing Violation:
//   - UB over-allocation: everything a kernel's pipe hands out must fit 196,608 bytes;
//   - DataCopy lengths, strides and UB addresses that are not whole 32-byte blocks;
//   - GM reads or writes outside the tensor the host passed (e.g. a page index past the table);
//   - queue misuse: AllocTensor with every buffer of the queue in use, DeQue of an empty queue,
//     buffers still held when the kernel ends;
//   - missing pipe synchronisation: the vector or scalar unit touching a buffer whose copy-in
//     was not waited for (EnQue/DeQue or an MTE2->V flag), a copy-out or scalar read of a buffer
//     the vector unit wrote without a V->MTE3 / V->S flag, a copy-in over a buffer the vector
//     unit used without a V->MTE2 flag, a vector read of scalar writes without an S->V flag.
// Not modelled: the cycle cost, bank conflicts, the cube unit (these kernels use the vector
// unit only), and the event ids of SetFlag/WaitFlag (a flag here syncs one buffer).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <stdexcept>
#include <string>
#include <vector>

#define ASC_DEVICE inline
#include "hw_910b.h"

namespace ascendc_emu {

struct Violation : std::runtime_error {
  using std::runtime_error::runtime_error;
};
[[noreturn]] inline void Fail(const std::string &what) { throw Violation(what); }

// -- 16-bit storage types -----------------------------------------------------------------
struct half {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

inline float Bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float Widen(float x) { return x; }
inline float Widen(bfloat16_t b) { return Bits(uint32_t(b.bits) << 16); }
inline float Widen(half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000) << 16, exp = (h.bits >> 10) & 0x1f, man = h.bits & 0x3ff;
  if (exp == 0x1f) return Bits(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return Bits(sign | ((exp + 112) << 23) | (man << 13));
  const float sub = std::ldexp(float(man), -24);  // subnormal: man * 2^-24, exact in fp32
  return sign ? -sub : sub;
}

template <class T>
T Narrow(float x);
template <>
inline float Narrow<float>(float x) { return x; }
template <>
inline bfloat16_t Narrow<bfloat16_t>(float x) {  // round to nearest even
  uint32_t u = Bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
template <>
inline half Narrow<half>(float x) {  // round to nearest even; finite overflow saturates (Cast doc)
  const uint32_t u = Bits(x), sign = (u >> 16) & 0x8000u, mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return {uint16_t(sign | 0x7e00u)};
  if (mag == 0x7f800000u) return {uint16_t(sign | 0x7c00u)};
  const int32_t exp = int32_t(mag >> 23) - 127 + 15;
  uint32_t man = mag & 0x7fffffu, h;
  if (exp <= 0) {  // fp16 subnormal (or zero)
    if (exp < -10) return {uint16_t(sign)};
    man |= 0x800000u;
    const int shift = 14 - exp;
    h = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
  } else {
    h = (uint32_t(exp) << 10) | (man >> 13);
    const uint32_t rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry steps the exponent up
  }
  if (h >= 0x7c00u) h = 0x7bffu;
  return {uint16_t(sign | h)};
}

// -- memories ------------------------------------------------------------------------------
struct BufState {
  std::string name;
  bool mte2Pending = false;  // copied in, not yet waited for
  bool vecDirty = false;     // written by the vector unit since the last flag
  bool vecRead = false;      // read by the vector unit since the last flag
  bool mte3Pending = false;  // being copied out, not yet waited for
  bool scalarDirty = false;  // written by the scalar unit since the last S->V flag
};

template <class T>
struct LocalTensor {
  T *p = nullptr;
  int64_t n = 0;        // elements from p to the end of the buffer
  int64_t ubOffset = 0;  // bytes from the start of UB
  BufState *st = nullptr;
  LocalTensor operator[](int64_t off) const {
    if (off < 0 || off > n) Fail("LocalTensor offset " + std::to_string(off) + " outside " + st->name);
    return {p + off, n - off, ubOffset + off * int64_t(sizeof(T)), st};
  }
  T GetValue(int64_t i) const {
    if (i < 0 || i >= n) Fail("GetValue outside " + st->name);
    if (st->mte2Pending) Fail("scalar read of " + st->name + " before its copy-in was waited for");
    if (st->vecDirty) Fail("scalar read of " + st->name + " after a vector write without a V->S flag");
    return p[i];
  }
  void SetValue(int64_t i, T v) const {
    if (i < 0 || i >= n) Fail("SetValue outside " + st->name);
    if (st->mte2Pending) Fail("scalar write of " + st->name + " before its copy-in was waited for");
    if (st->vecDirty || st->vecRead) Fail("scalar write of " + st->name + " while the vector unit may use it (no V->S flag)");
    st->scalarDirty = true;
    p[i] = v;
  }
};

template <class T>
struct GlobalTensor {
  T *p = nullptr;
  int64_t n = 0;
  std::string name;
  void SetGlobalBuffer(T *ptr, int64_t count, const char *label = "gm") { p = ptr, n = count, name = label; }
  GlobalTensor operator[](int64_t off) const {
    if (off < 0 || off > n) Fail("GM offset " + std::to_string(off) + " outside " + name);
    return {p + off, n - off, name};
  }
  T GetValue(int64_t i) const {
    if (i < 0 || i >= n) Fail("GM read outside " + name);
    return p[i];
  }
};

class TPipe {
 public:
  TPipe() : ub_(ascendc_hw::kUbBytes + ascendc_hw::kBlockBytes) {}
  ~TPipe() = default;
  // Places `bytes` (rounded up to 32) in UB; fails when the total passes the 910B's UB.
  template <class T>
  LocalTensor<T> Reserve(int64_t count, const std::string &name) {
    const int64_t bytes = ascendc_hw::AlignUp(count * int64_t(sizeof(T)), ascendc_hw::kBlockBytes);
    if (used_ + bytes > ascendc_hw::kUbBytes)
      Fail("UB overflow: " + name + " needs " + std::to_string(bytes) + " B with " + std::to_string(used_) +
           " of " + std::to_string(ascendc_hw::kUbBytes) + " B already placed");
    states_.push_back(BufState{name});
    LocalTensor<T> t{reinterpret_cast<T *>(base() + used_), count, used_, &states_.back()};
    used_ += bytes;
    return t;
  }
  int64_t Used() const { return used_; }

 private:
  uint8_t *base() {  // 32-byte aligned start of the emulated UB
    const uintptr_t a = reinterpret_cast<uintptr_t>(ub_.data());
    return ub_.data() + (ascendc_hw::kBlockBytes - a % ascendc_hw::kBlockBytes) % ascendc_hw::kBlockBytes;
  }
  std::vector<uint8_t> ub_;
  std::deque<BufState> states_;  // stable addresses
  int64_t used_ = 0;
};

inline void Clean(BufState *st) { st->mte2Pending = st->vecDirty = st->vecRead = st->mte3Pending = st->scalarDirty = false; }

// A TQue / TQueBind with `num` buffers: AllocTensor -> (copy or compute) -> EnQue -> DeQue ->
// (compute or copy) -> FreeTensor. EnQue/DeQue is the hand-over between pipes (it syncs).
template <class T>
class Queue {
 public:
  void Init(TPipe &pipe, int64_t num, int64_t count, const std::string &name) {
    if (num < 1 || num > ascendc_hw::kMaxQueueBuffers) Fail("queue " + name + ": bad buffer count");
    name_ = name;
    for (int64_t i = 0; i < num; ++i) free_.push_back(pipe.Reserve<T>(count, name + "[" + std::to_string(i) + "]"));
    num_ = num;
  }
  LocalTensor<T> AllocTensor() {
    if (free_.empty()) Fail("queue " + name_ + ": AllocTensor with all " + std::to_string(num_) + " buffers in use");
    LocalTensor<T> t = free_.front();
    free_.pop_front();
    Clean(t.st);
    return t;
  }
  void EnQue(const LocalTensor<T> &t) { queued_.push_back(t); }
  LocalTensor<T> DeQue() {
    if (queued_.empty()) Fail("queue " + name_ + ": DeQue of an empty queue");
    LocalTensor<T> t = queued_.front();
    queued_.pop_front();
    Clean(t.st);
    return t;
  }
  void FreeTensor(const LocalTensor<T> &t) { free_.push_back(t); }
  void CheckIdle() const {
    if (int64_t(free_.size()) != num_) Fail("queue " + name_ + ": buffers still held at the end of the kernel");
  }

 private:
  std::string name_;
  std::deque<LocalTensor<T>> free_, queued_;
  int64_t num_ = 0;
};

// -- the primitive layer ---------------------------------------------------------------------
struct EmuLayer {
  template <class T>
  using Local = LocalTensor<T>;
  template <class T>
  using Global = GlobalTensor<T>;
  using Pipe = TPipe;
  template <class T>
  using QueIn = Queue<T>;
  template <class T>
  using QueOut = Queue<T>;
  template <class T>
  using QueInOut = Queue<T>;
  using Half = half;
  using BFloat16 = bfloat16_t;

  template <class T>
  static void InitQueue(Pipe &pipe, Queue<T> &q, int64_t num, int64_t count, const char *name) {
    q.Init(pipe, num, count, name);
  }
  struct Arena {  // calculation buffers (TBuf on the device; ascendc_layer.h holds 16)
    int used = 0;
    template <class T>
    Local<T> Get(Pipe &pipe, int64_t count, const char *name) {
      if (++used > 16) Fail(std::string("more than 16 calculation buffers: ") + name);
      return pipe.Reserve<T>(count, name);
    }
  };

  // GM -> UB, `count` contiguous elements.
  template <class T>
  static void CopyIn(const Local<T> &dst, const Global<T> &src, int64_t count) {
    CheckCopy(dst, count, "CopyIn");
    if (count > src.n) Fail("GM read past the end of " + src.name);
    CheckOverwrite(dst);
    std::memcpy(dst.p, src.p, count * sizeof(T));
    dst.st->mte2Pending = true;
  }
  // GM -> UB, `rows` rows of `cols` elements, GM rows `srcStride` elements apart, packed in UB.
  template <class T>
  static void CopyInRows(const Local<T> &dst, const Global<T> &src, int64_t rows, int64_t cols, int64_t srcStride) {
    CheckCopy(dst, rows * cols, "CopyInRows");
    if (!Aligned<T>(cols) || !Aligned<T>(srcStride - cols) || srcStride < cols)
      Fail("CopyInRows: row length or gap of " + dst.st->name + " is not whole 32-byte blocks");
    if (rows > 0 && (rows - 1) * srcStride + cols > src.n) Fail("GM read past the end of " + src.name);
    CheckOverwrite(dst);
    for (int64_t r = 0; r < rows; ++r) std::memcpy(dst.p + r * cols, src.p + r * srcStride, cols * sizeof(T));
    dst.st->mte2Pending = true;
  }
  // UB -> GM, `count` contiguous elements.
  template <class T>
  static void CopyOut(const Global<T> &dst, const Local<T> &src, int64_t count) {
    CheckCopy(src, count, "CopyOut");
    if (count > dst.n) Fail("GM write past the end of " + dst.name);
    if (src.st->vecDirty || src.st->scalarDirty)
      Fail("copy-out of " + src.st->name + " before the writes to it were handed over (V->MTE3)");
    if (src.st->mte2Pending) Fail("copy-out of " + src.st->name + " before its copy-in was waited for");
    std::memcpy(dst.p, src.p, count * sizeof(T));
    src.st->mte3Pending = true;
  }

  // UB -> GM of any byte length (DataCopyPad): for rows whose length is not whole 32-byte blocks.
  template <class T>
  static void CopyOutPad(const Global<T> &dst, const Local<T> &src, int64_t count) {
    if (count <= 0 || count > src.n) Fail("CopyOutPad: length outside " + src.st->name);
    if (src.ubOffset % ascendc_hw::kBlockBytes) Fail("CopyOutPad: UB address of " + src.st->name + " not 32-byte aligned");
    if (count > dst.n) Fail("GM write past the end of " + dst.name);
    if (src.st->vecDirty || src.st->scalarDirty || src.st->mte2Pending)
      Fail("copy-out of " + src.st->name + " before the writes to it were handed over");
    std::memcpy(dst.p, src.p, count * sizeof(T));
    src.st->mte3Pending = true;
  }

  // Flags between pipes (SetFlag + WaitFlag on the device).
  template <class T>
  static void WaitCopyIn(const Local<T> &t) { t.st->mte2Pending = false; }  // MTE2 -> V/S
  template <class T>
  static void VectorToScalar(const Local<T> &t) { t.st->vecDirty = t.st->vecRead = false; }  // V -> S
  template <class T>
  static void VectorToCopyOut(const Local<T> &t) { t.st->vecDirty = false; }  // V -> MTE3
  template <class T>
  static void VectorToCopyIn(const Local<T> &t) { t.st->vecDirty = t.st->vecRead = false; }  // V -> MTE2
  template <class T>
  static void CopyOutDone(const Local<T> &t) { t.st->mte3Pending = false; }  // MTE3 -> MTE2 / V
  template <class T>
  static void ScalarToVector(const Local<T> &t) { t.st->scalarDirty = false; }  // S -> V
  template <class T>
  static void ScalarToCopyOut(const Local<T> &t) { t.st->scalarDirty = false; }  // S -> MTE3

  // Vector unit: elementwise over `n` elements, fp32 arithmetic.
  template <class T>
  static void Duplicate(const Local<T> &dst, T value, int64_t n) {
    Out(dst, n);
    for (int64_t i = 0; i < n; ++i) dst.p[i] = value;
  }
  static void Muls(const Local<float> &dst, const Local<float> &src, float s, int64_t n) {
    Out(dst, n), In(src, n);
    for (int64_t i = 0; i < n; ++i) dst.p[i] = src.p[i] * s;
  }
  static void Adds(const Local<float> &dst, const Local<float> &src, float s, int64_t n) {
    Out(dst, n), In(src, n);
    for (int64_t i = 0; i < n; ++i) dst.p[i] = src.p[i] + s;
  }
  static void Exp(const Local<float> &dst, const Local<float> &src, int64_t n) {
    Out(dst, n), In(src, n);
    for (int64_t i = 0; i < n; ++i) dst.p[i] = std::exp(src.p[i]);
  }
  static void Mul(const Local<float> &dst, const Local<float> &a, const Local<float> &b, int64_t n) {
    Out(dst, n), In(a, n), In(b, n);
    for (int64_t i = 0; i < n; ++i) dst.p[i] = a.p[i] * b.p[i];
  }
  static void Add(const Local<float> &dst, const Local<float> &a, const Local<float> &b, int64_t n) {
    Out(dst, n), In(a, n), In(b, n);
    for (int64_t i = 0; i < n; ++i) dst.p[i] = a.p[i] + b.p[i];
  }
  static void Max(const Local<float> &dst, const Local<float> &a, const Local<float> &b, int64_t n) {
    Out(dst, n), In(a, n), In(b, n);
    for (int64_t i = 0; i < n; ++i) dst.p[i] = std::max(a.p[i], b.p[i]);
  }
  // dst += s * src (dst and src must not overlap, as the Axpy doc requires).
  static void Axpy(const Local<float> &dst, const Local<float> &src, float s, int64_t n) {
    Out(dst, n), In(src, n);
    if (dst.p < src.p + n && src.p < dst.p + n) Fail("Axpy: source and destination overlap");
    for (int64_t i = 0; i < n; ++i) dst.p[i] += src.p[i] * s;
  }
  template <class D, class S>
  static void Cast(const Local<D> &dst, const Local<S> &src, int64_t n) {
    Out(dst, n), In(src, n);
    for (int64_t i = 0; i < n; ++i) dst.p[i] = Narrow<D>(Widen(src.p[i]));
  }
  // dst[i] = the element of src at byte offset offsets[i] (in-UB element gather, count mode).
  template <class T>
  static void Gather(const Local<T> &dst, const Local<T> &src, const Local<uint32_t> &offsets, int64_t n) {
    Out(dst, n), In(offsets, n), In(src, 1);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t at = offsets.p[i];
      if (at % sizeof(T) || at / sizeof(T) >= uint64_t(src.n)) Fail("Gather offset outside " + src.st->name);
      dst.p[i] = src.p[at / sizeof(T)];
    }
  }
  // dst[0] = sum / max of src[0..n); `work` is the instruction's scratch (>= one fp32 per repeat).
  static void ReduceSum(const Local<float> &dst, const Local<float> &src, const Local<float> &work, int64_t n) {
    Reduce(dst, src, work, n);
    // Atlas A2, count mode: a binary tree inside each 256-byte repeat, repeats added in order.
    float acc = 0.f, lane[64];
    for (int64_t r = 0; r < n; r += 64) {
      for (int64_t i = 0; i < 64; ++i) lane[i] = r + i < n ? src.p[r + i] : 0.f;
      for (int64_t w = 32; w > 0; w /= 2)
        for (int64_t i = 0; i < w; ++i) lane[i] = lane[2 * i] + lane[2 * i + 1];
      acc += lane[0];
    }
    dst.p[0] = acc;
  }
  static void ReduceMax(const Local<float> &dst, const Local<float> &src, const Local<float> &work, int64_t n) {
    Reduce(dst, src, work, n);
    float acc = -INFINITY;
    for (int64_t i = 0; i < n; ++i) acc = std::max(acc, src.p[i]);
    dst.p[0] = acc;
  }

 private:
  template <class T>
  static bool Aligned(int64_t count) {
    return count * int64_t(sizeof(T)) % ascendc_hw::kBlockBytes == 0;
  }
  template <class T>
  static void CheckCopy(const Local<T> &ub, int64_t count, const char *what) {
    if (count <= 0 || count > ub.n) Fail(std::string(what) + ": length outside " + ub.st->name);
    if (!Aligned<T>(count))
      Fail(std::string(what) + " of " + std::to_string(count * sizeof(T)) + " B into " + ub.st->name +
           " is not whole 32-byte blocks");
    if (ub.ubOffset % ascendc_hw::kBlockBytes) Fail(std::string(what) + ": UB address of " + ub.st->name + " not 32-byte aligned");
  }
  template <class T>
  static void CheckOverwrite(const Local<T> &dst) {
    if (dst.st->vecDirty || dst.st->vecRead)
      Fail("copy-in over " + dst.st->name + " while the vector unit may use it (no V->MTE2 flag)");
    if (dst.st->mte3Pending) Fail("copy-in over " + dst.st->name + " while its copy-out may run (no MTE3->MTE2 flag)");
  }
  // Every vector operand: in range, 32-byte aligned, its copy-in and scalar writes waited for.
  template <class T>
  static void Vec(const Local<T> &t, int64_t n, bool write) {
    if (n <= 0 || n > t.n) Fail("vector op length " + std::to_string(n) + " outside " + t.st->name);
    if (t.ubOffset % ascendc_hw::kBlockBytes) Fail("vector operand in " + t.st->name + " not 32-byte aligned");
    if (t.st->mte2Pending) Fail("vector op on " + t.st->name + " before its copy-in was waited for");
    if (t.st->scalarDirty) Fail("vector op on " + t.st->name + " after scalar writes without an S->V flag");
    if (write && t.st->mte3Pending) Fail("vector write to " + t.st->name + " while its copy-out may run");
    (write ? t.st->vecDirty : t.st->vecRead) = true;
  }
  template <class T>
  static void Out(const Local<T> &t, int64_t n) { Vec(t, n, true); }
  template <class T>
  static void In(const Local<T> &t, int64_t n) { Vec(t, n, false); }
  static void Reduce(const Local<float> &dst, const Local<float> &src, const Local<float> &work, int64_t n) {
    Out(dst, 1), In(src, n), Out(work, ascendc_hw::ReduceWorkElems(n));
  }
};

}  // namespace ascendc_emu
