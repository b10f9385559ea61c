// InfLLM-v2 stage 2 (docs/minicpm4.md#infllm-v2-block-sparse-attention): attention restricted to the selected 64-token blocks,
// read straight from the paged KV cache, for prefill chunks and decode alike (token-causal inside
// a block), with an online softmax in fp32 - written once over a primitive layer L (AscendC on
// the NPU, the emulation in the tests). Same contract as the CPU kernel ../cpu.cc:
//   q             [B, L, Hq, D] T
//   k/v_cache     [S, Hkv, D] T       slot-major; token t of row b is in slot
//                                     block_tables[b, t / page] * page + t % page
//   positions     [B, L] int32 (-1: padding, output zeros)
//   block_tables  [B, P] int32
//   selected      [B, Hkv, L, NB] int32 (1 = the query's group attends to the block)
//   out           [B, L, Hq * D] T    (the fp32 result rounded to nearest even once)
#pragma once
#include "kernel_helpers.h"
#include "sparse_attention_tiling.h"

namespace infllm_kernel {

template <class L, class T>
struct AttentionTensors {
  typename L::template Global<T> q, kCache, vCache, out;
  typename L::template Global<int32_t> positions, blockTables, selected;
};

template <class L, class T>
class SparseAttention {
  template <class E>
  using Local = typename L::template Local<E>;
  static constexpr float kNoMax = -3.0e38f;  // running max before the first block

 public:
  ASC_DEVICE void Init(typename L::Pipe &pipe, const infllm_tiling::AttentionTiling &t,
                       const AttentionTensors<L, T> &g) {
    t_ = t, g_ = g, group_ = t.headsPerUnit;
    const int64_t d = t.headDim, n = infllm_tiling::kSelectBlock;
    qIn_ = arena_.template Get<T>(pipe, group_ * d, "q_in");
    qf_ = arena_.template Get<float>(pipe, group_ * d, "q_f32");
    L::InitQueue(pipe, kvIn_, 2, n * d, "kv_in");
    kf_ = arena_.template Get<float>(pipe, n * d, "k_f32");
    vf_ = arena_.template Get<float>(pipe, n * d, "v_f32");
    keyCols_ = arena_.template Get<float>(pipe, n * d, "k_cols");
    offsets_ = arena_.template Get<uint32_t>(pipe, n * d, "transpose_offsets");
    acc_ = arena_.template Get<float>(pipe, group_ * d, "acc");
    dot_ = arena_.template Get<float>(pipe, 8, "dot");
    tiny_ = arena_.template Get<float>(pipe, 8, "tiny");
    work_ = arena_.template Get<float>(pipe, ascendc_hw::ReduceWorkElems(d), "work");
    probs_ = arena_.template Get<float>(pipe, n, "probs");
    stats_ = arena_.template Get<float>(pipe, ascendc_hw::AlignUp(2 * group_, 8), "stats");
    L::InitQueue(pipe, out_, 1, group_ * d, "out");
    ascendc_helpers::TransposeOffsets<L>(offsets_, n, d);
  }

  ASC_DEVICE void Process(int64_t core) {
    const auto units = ascendc_tiling::CoreUnits(infllm_tiling::UnitCount(t_), t_.coreNum, core);
    for (int64_t u = units.begin; u < units.end; ++u) Unit(infllm_tiling::UnitOf(t_, u));
  }

  template <class F>
  void ForEachQueue(F f) {  // the emulation checks every queue is idle at the end
    f(kvIn_), f(out_);
  }

 private:
  ASC_DEVICE void Unit(const infllm_tiling::AttentionUnit &u) {
    const int64_t d = t_.headDim, pos = g_.positions.GetValue(u.b * t_.queries + u.i);
    const int64_t at = ((u.b * t_.queries + u.i) * t_.qHeads + u.firstHead) * d;  // q and out
    L::Duplicate(acc_, 0.f, group_ * d);
    if (pos >= 0) Attend(u, pos, at);
    Local<T> o = out_.AllocTensor();
    L::Cast(o, acc_, group_ * d);
    out_.EnQue(o);
    o = out_.DeQue();
    L::CopyOut(g_.out[at], o, group_ * d);
    out_.FreeTensor(o);
  }

  ASC_DEVICE void Attend(const infllm_tiling::AttentionUnit &u, int64_t pos, int64_t at) {
    const int64_t d = t_.headDim, n0 = infllm_tiling::kSelectBlock;
    L::VectorToCopyIn(qIn_);
    L::CopyIn(qIn_, g_.q[at], group_ * d);
    L::WaitCopyIn(qIn_);
    L::Cast(qf_, qIn_, group_ * d);
    L::VectorToScalar(qf_);
    L::VectorToScalar(stats_);
    for (int64_t g = 0; g < group_; ++g) stats_.SetValue(2 * g, kNoMax), stats_.SetValue(2 * g + 1, 0.f);
    const int64_t keys = t_.tablePages * t_.pageSize;  // what the row's table can address
    for (int64_t blk = 0; blk <= pos / n0 && blk < t_.blocks; ++blk) {
      const int64_t first = blk * n0, n = ascendc_helpers::Min(ascendc_helpers::Min(n0, pos + 1 - first), keys - first);
      if (n <= 0 || !g_.selected.GetValue(u.row * t_.blocks + blk)) continue;
      Load(kf_, g_.kCache, u.b, u.h, first, n);
      L::Gather(keyCols_, kf_, offsets_, n0 * d);  // rows past n are stale and never used
      Load(vf_, g_.vCache, u.b, u.h, first, n);
      for (int64_t g = 0; g < group_; ++g) Fold(g, n);
    }
    for (int64_t g = 0; g < group_; ++g) {
      const float sum = stats_.GetValue(2 * g + 1);
      if (sum > 0.f) L::Muls(acc_[g * d], acc_[g * d], 1.f / sum, d);
    }
  }

  // dst = tokens [first, first + n) of KV head h of row b, widened to fp32: one strided copy per
  // run of consecutive slots inside a page.
  ASC_DEVICE void Load(const Local<float> &dst, const typename L::template Global<T> &cache, int64_t b, int64_t h,
                       int64_t first, int64_t n) {
    const int64_t d = t_.headDim, ps = t_.pageSize;
    Local<T> raw = kvIn_.AllocTensor();
    for (int64_t tok = first; tok < first + n;) {
      const int64_t off = tok % ps, run = ascendc_helpers::Min(first + n - tok, ps - off);
#ifndef MUTATE_PAGE_INDEX
      const int64_t page = tok / ps;
#else  // mutation for the tests: the next page of the table
      const int64_t page = (tok / ps + 1) % t_.tablePages;
#endif
      const int64_t slot = int64_t(g_.blockTables.GetValue(b * t_.tablePages + page)) * ps + off;
      L::CopyInRows(raw[(tok - first) * d], cache[(slot * t_.kvHeads + h) * d], run, d, t_.kvHeads * d);
      tok += run;
    }
    kvIn_.EnQue(raw);
    raw = kvIn_.DeQue();
    L::Cast(dst, raw, n * d);
    kvIn_.FreeTensor(raw);
  }

  // Folds the loaded block into head g's running softmax: m = running max, l = running sum,
  // acc = unnormalised output; earlier blocks are rescaled by exp(m_old - m_new).
  ASC_DEVICE void Fold(int64_t g, int64_t n) {
    const int64_t d = t_.headDim;
    const Local<float> acc = acc_[g * d];
    ascendc_helpers::ScaledScores<L>(probs_, qf_[g * d], keyCols_, d, infllm_tiling::kSelectBlock, t_.scale);
    L::ReduceMax(dot_, probs_, work_, n);
    L::VectorToScalar(dot_);
    const float old = stats_.GetValue(2 * g), top = ascendc_helpers::Max(old, dot_.GetValue(0));
    L::Adds(probs_, probs_, -top, n);
    L::Exp(probs_, probs_, n);
    L::ReduceSum(dot_, probs_, work_, n);
    L::VectorToScalar(dot_);
    L::VectorToScalar(probs_);
    const float rescale = old == kNoMax ? 0.f : ascendc_helpers::ScalarExp<L>(tiny_, old - top);
#ifndef MUTATE_MISSING_RESCALE
    L::Muls(acc, acc, rescale, d);
    stats_.SetValue(2 * g + 1, stats_.GetValue(2 * g + 1) * rescale + dot_.GetValue(0));
#else  // mutation for the tests: earlier blocks keep the old max's scale
    stats_.SetValue(2 * g + 1, stats_.GetValue(2 * g + 1) + dot_.GetValue(0));
#endif
    stats_.SetValue(2 * g, top);
    for (int64_t j = 0; j < n; ++j) L::Axpy(acc, vf_[j * d], probs_.GetValue(j), d);
  }

  typename L::Arena arena_;
  infllm_tiling::AttentionTiling t_;
  AttentionTensors<L, T> g_;
  int64_t group_ = 1;
  typename L::template QueIn<T> kvIn_;
  typename L::template QueOut<T> out_;
  Local<T> qIn_;
  Local<float> qf_, kf_, vf_, keyCols_, acc_, dot_, tiny_, work_, probs_, stats_;
  Local<uint32_t> offsets_;
};

}  // namespace infllm_kernel
