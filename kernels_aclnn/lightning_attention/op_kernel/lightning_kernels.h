// Lightning attention (MiniMax linear attention, docs/minimax.md#lightning-attention-recurrence, #lightning-block-form), the per-unit
// algorithm written once over a primitive layer L: ascendc_common/ascendc_layer.h on the NPU,
// ascendc_common/emu_layer.h in the tests. T is the activation type (L::Half or L::BFloat16);
// q/k/v are widened to fp32 on load, and decays, the state and the output stay fp32 (docs/minimax.md#precision-rules).
//
// Inputs (row-major):
//   q, k, v     decode [B, H, D]; prefill [B, L, H, D]        T (after the SiLU)
//   slopes      [H] fp32                                        lambda_h = exp(-slopes[h])
//   state_pool  [slots, H, D, D] fp32, read and written in place at state_slots[b]
//   state_slots [B] int32                                       -1: padding row, nothing read or written
//   positions   decode [B]; prefill [B, L] int32                 -1: padding (prefill: trailing only);
//                                                                a row starting at position 0 starts
//                                                                from a zero state
// Output: o    decode [B, H*D]; prefill [B, L, H*D] fp32 (zeros for padding)
//
// Work unit = (row, head); all its loops go through the tiling header's helpers, which the tiling
// grid test checks for coverage. The vector unit only: a state row update is Muls + Axpy, a
// read q.S is D Axpy of S's rows.
#pragma once
#include "lightning_tiling.h"

namespace lightning_kernel {

template <class L, class T>
struct Tensors {
  typename L::template Global<T> q, k, v;
  typename L::template Global<float> slopes, statePool, out;
  typename L::template Global<int32_t> slots, positions;
};

// Decode: S <- lambda S + k^T v, then o = q S (the update comes before the read, docs/minimax.md#lightning-attention-recurrence).
template <class L, class T>
class LightningDecode {
  template <class E>
  using Local = typename L::template Local<E>;

 public:
  ASC_DEVICE void Init(typename L::Pipe &pipe, const lightning_tiling::DecodeTiling &t, const Tensors<L, T> &g) {
    t_ = t, g_ = g;
    const int64_t d = t.headDim;
    in_ = arena_.template Get<T>(pipe, 3 * d, "qkv_in");
    f32_ = arena_.template Get<float>(pipe, 3 * d, "qkv_f32");
    decay_ = arena_.template Get<float>(pipe, 8, "decay");
    L::InitQueue(pipe, state_, t.stateBuffers, t.rowsPerTile * d, "state");
    L::InitQueue(pipe, out_, 1, d, "out");
  }

  ASC_DEVICE void Process(int64_t core) {
    const auto units = ascendc_tiling::CoreUnits(t_.batch * t_.heads, t_.coreNum, core);
    for (int64_t u = units.begin; u < units.end; ++u) Unit(u / t_.heads, u % t_.heads);
  }

  template <class F>
  void ForEachQueue(F f) {  // the emulation checks every queue is idle at the end
    f(state_), f(out_);
  }

 private:
  ASC_DEVICE void Unit(int64_t b, int64_t h) {
    const int64_t d = t_.headDim;
    const int32_t slot = g_.slots.GetValue(b), pos = g_.positions.GetValue(b);
    Local<float> o = out_.AllocTensor();
    L::Duplicate(o, 0.f, d);
    if (slot >= 0 && pos >= 0) Update(b, h, slot, pos == 0, o);
    out_.EnQue(o);
    o = out_.DeQue();
    L::CopyOut(g_.out[(b * t_.heads + h) * d], o, d);
    out_.FreeTensor(o);
  }

  ASC_DEVICE void Update(int64_t b, int64_t h, int64_t slot, bool fresh, const Local<float> &o) {
    const int64_t d = t_.headDim, rows = t_.rowsPerTile, off = (b * t_.heads + h) * d;
    L::VectorToCopyIn(in_);
    L::CopyIn(in_, g_.q[off], d);
    L::CopyIn(in_[d], g_.k[off], d);
    L::CopyIn(in_[2 * d], g_.v[off], d);
#ifndef MUTATE_MISSING_SYNC  // mutation for the tests: the emulation must catch the missing flag
    L::WaitCopyIn(in_);
#endif
    L::Cast(f32_, in_, 3 * d);
    const Local<float> q = f32_, k = f32_[d], v = f32_[2 * d];
    // lambda = exp(-s): the scalar unit has no exp, so one vector Exp.
    L::Duplicate(decay_, -g_.slopes.GetValue(h), 8);
    L::Exp(decay_, decay_, 8);
    L::VectorToScalar(decay_);
    L::VectorToScalar(f32_);
    const float lambda = decay_.GetValue(0);
    const int64_t base = (slot * t_.heads + h) * d * d;
    for (int64_t r0 = 0; r0 < d; r0 += rows) {
      Local<float> s = state_.AllocTensor();
      if (fresh) {
        L::Duplicate(s, 0.f, rows * d);
      } else {
        L::CopyIn(s, g_.statePool[base + r0 * d], rows * d);
        state_.EnQue(s);
        s = state_.DeQue();
      }
      for (int64_t i = 0; i < rows; ++i) {
        const Local<float> row = s[i * d];
        const float kd = k.GetValue(r0 + i), qd = q.GetValue(r0 + i);
#ifndef MUTATE_DECAY_EXPONENT
        L::Muls(row, row, lambda, d);
        L::Axpy(row, v, kd, d);
#else  // mutation for the tests: the new token decays once too (exponent t-j+1)
        L::Axpy(row, v, kd, d);
        L::Muls(row, row, lambda, d);
#endif
        L::Axpy(o, row, qd, d);
      }
      state_.EnQue(s);
      s = state_.DeQue();
      L::CopyOut(g_.statePool[base + r0 * d], s, rows * d);
      state_.FreeTensor(s);
    }
  }

  typename L::Arena arena_;
  lightning_tiling::DecodeTiling t_;
  Tensors<L, T> g_;
  Local<T> in_;
  Local<float> f32_, decay_;
  typename L::template QueInOut<float> state_;
  typename L::template QueOut<float> out_;
};

// Prefill of a row's chunk from its cached state, exact block form (docs/minimax.md#lightning-block-form) per block of m tokens:
//   o_i  = sum_{j<=i} lambda^(i-j) (q_i.k_j) v_j + lambda^(i+1) q_i S_in
//   S_out = lambda^m S_in + sum_j lambda^(m-1-j) k_j^T v_j
// Only relative exponents <= 0 appear, so nothing overflows.
template <class L, class T>
class LightningPrefill {
  template <class E>
  using Local = typename L::template Local<E>;

 public:
  ASC_DEVICE void Init(typename L::Pipe &pipe, const lightning_tiling::PrefillTiling &t, const Tensors<L, T> &g) {
    t_ = t, g_ = g;
    const int64_t d = t.headDim, m = t.blockLen;
    state_ = arena_.template Get<float>(pipe, d * d, "state");
    L::InitQueue(pipe, in_, 2, m * d, "in");
    kf_ = arena_.template Get<float>(pipe, m * d, "k_f32");
    vf_ = arena_.template Get<float>(pipe, m * d, "v_f32");
    qf_ = arena_.template Get<float>(pipe, d, "q_f32");
    prod_ = arena_.template Get<float>(pipe, d, "prod");
    powers_ = arena_.template Get<float>(pipe, lightning_tiling::PowerTableElems(m), "powers");
    dot_ = arena_.template Get<float>(pipe, 8, "dot");
    work_ = arena_.template Get<float>(pipe, ascendc_hw::ReduceWorkElems(d), "work");
    L::InitQueue(pipe, out_, 2, d, "out");
  }

  ASC_DEVICE void Process(int64_t core) {
    const auto units = ascendc_tiling::CoreUnits(t_.batch * t_.heads, t_.coreNum, core);
    for (int64_t u = units.begin; u < units.end; ++u) Unit(u / t_.heads, u % t_.heads);
  }

  template <class F>
  void ForEachQueue(F f) {  // the emulation checks every queue is idle at the end
    f(in_), f(out_);
  }

 private:
  ASC_DEVICE void Unit(int64_t b, int64_t h) {
    const int64_t d = t_.headDim, len = t_.seqLen;
    const int32_t slot = g_.slots.GetValue(b);
    int64_t n = 0;  // the row's tokens: padding only after them
    while (slot >= 0 && n < len && g_.positions.GetValue(b * len + n) >= 0) ++n;
    if (n > 0) {
      Powers(h);
      const int64_t at = (slot * t_.heads + h) * d * d;
      L::VectorToCopyIn(state_);
      L::CopyOutDone(state_);
      if (g_.positions.GetValue(b * len) == 0) {
        L::Duplicate(state_, 0.f, d * d);
      } else {
        L::CopyIn(state_, g_.statePool[at], d * d);
        L::WaitCopyIn(state_);
      }
      for (int64_t i = 0; i < lightning_tiling::BlockCount(n, t_.blockLen); ++i)
        Block(b, h, i * t_.blockLen, lightning_tiling::BlockLen(n, t_.blockLen, i));
      L::VectorToCopyOut(state_);
      L::CopyOut(g_.statePool[at], state_, d * d);
    }
    for (int64_t i = n; i < len; ++i) {  // padding rows
      Local<float> o = out_.AllocTensor();
      L::Duplicate(o, 0.f, d);
      Emit(o, b, i, h);
    }
  }

  // powers_[t] = lambda^t = exp(-s t) for t = 0..blockLen.
  ASC_DEVICE void Powers(int64_t h) {
    const int64_t n = lightning_tiling::PowerTableElems(t_.blockLen);
    L::VectorToScalar(powers_);
    for (int64_t t = 0; t < n; ++t) powers_.SetValue(t, float(t));
    L::ScalarToVector(powers_);
    L::Muls(powers_, powers_, -g_.slopes.GetValue(h), n);
    L::Exp(powers_, powers_, n);
    L::VectorToScalar(powers_);
  }

  ASC_DEVICE void Load(const Local<float> &dst, const typename L::template Global<T> &src, int64_t rows) {
    Local<T> raw = in_.AllocTensor();
    L::CopyInRows(raw, src, rows, t_.headDim, t_.heads * t_.headDim);
    in_.EnQue(raw);
    raw = in_.DeQue();
    L::Cast(dst, raw, rows * t_.headDim);
    in_.FreeTensor(raw);
  }

  ASC_DEVICE void Block(int64_t b, int64_t h, int64_t start, int64_t m) {
    const int64_t d = t_.headDim, first = ((b * t_.seqLen + start) * t_.heads + h) * d;
    Load(kf_, g_.k[first], m);
    Load(vf_, g_.v[first], m);
    L::VectorToScalar(kf_);
    for (int64_t i = 0; i < m; ++i) Row(b, h, start, i);
    // S_out = lambda^m S_in + sum_j lambda^(m-1-j) k_j^T v_j
    L::Muls(state_, state_, powers_.GetValue(m), d * d);
    for (int64_t j = 0; j < m; ++j) {
      const float w = powers_.GetValue(m - 1 - j);
      for (int64_t r = 0; r < d; ++r) L::Axpy(state_[r * d], vf_[j * d], kf_.GetValue(j * d + r) * w, d);
    }
  }

  ASC_DEVICE void Row(int64_t b, int64_t h, int64_t start, int64_t i) {
    const int64_t d = t_.headDim;
    Load(qf_, g_.q[((b * t_.seqLen + start + i) * t_.heads + h) * d], 1);
    L::VectorToScalar(qf_);
    Local<float> o = out_.AllocTensor();
    L::Duplicate(o, 0.f, d);
    for (int64_t j = 0; j <= i; ++j) {  // intra-block: lambda^(i-j) (q.k_j) v_j
      L::Mul(prod_, qf_, kf_[j * d], d);
      L::ReduceSum(dot_, prod_, work_, d);
      L::VectorToScalar(dot_);
      L::Axpy(o, vf_[j * d], dot_.GetValue(0) * powers_.GetValue(i - j), d);
    }
#ifndef MUTATE_DECAY_EXPONENT
    const float a = powers_.GetValue(i + 1);  // inter-block: lambda^(i+1) q S_in
#else  // mutation for the tests: vLLM's zero-based query decay (docs/minimax.md#known-discrepancies)
    const float a = powers_.GetValue(i);
#endif
    for (int64_t r = 0; r < d; ++r) L::Axpy(o, state_[r * d], qf_.GetValue(r) * a, d);
    Emit(o, b, start + i, h);
  }

  ASC_DEVICE void Emit(Local<float> o, int64_t b, int64_t t, int64_t h) {
    out_.EnQue(o);
    o = out_.DeQue();
    L::CopyOut(g_.out[((b * t_.seqLen + t) * t_.heads + h) * t_.headDim], o, t_.headDim);
    out_.FreeTensor(o);
  }

  typename L::Arena arena_;
  lightning_tiling::PrefillTiling t_;
  Tensors<L, T> g_;
  typename L::template QueIn<T> in_;
  typename L::template QueOut<float> out_;
  Local<float> state_, kf_, vf_, qf_, prod_, powers_, dot_, work_;
};

}  // namespace lightning_kernel
