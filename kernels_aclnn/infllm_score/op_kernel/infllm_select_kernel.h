// InfLLM-v2 block selection (docs/minicpm4.md#infllm-v2-relevance-scores, #infllm-v2-pooling, #infllm-v2-top-k: stage-1 scores, the group reduction with the
// repeat-to-16 rule, max-pooling to 64-token blocks, init/local blocks forced, top-k with ties to
// the lower block index; both variants), written once over a primitive layer L (AscendC on the
// NPU, the emulation in the tests). Same contract as the CPU kernel ../cpu.cc:
//   q          [B, L, Hq, D]  T        c1_cache, c2_cache [E, Hkv, D] T (compressed keys)
//   positions  [B, L] int32 (-1: padding, selects nothing)
//   c1_table   [B, N1] int32, N1 = 4 NB - 1    c2_table [B, N2] int32   (entry j of row b lives at
//              cache row table[b, j])
//   selected   [B, Hkv, L, NB] int32 (1 = the query's group attends to the block)
// A row shorter than dense_len (dense_len >= 0) selects every past block (dense attention).
// Scores and softmax statistics are fp32; the normaliser is accumulated online over chunks.
#pragma once
#include "kernel_helpers.h"
#include "infllm_select_tiling.h"

namespace infllm_kernel {

using ascendc_helpers::Max;
using ascendc_helpers::Min;

constexpr int64_t kStride1 = 16, kKernel1 = 32, kStride2 = 64, kKernel2 = 128, kBlock = 64;
constexpr float kForced = 3.0e38f, kNone = -3.0e38f;  // +-inf stand-ins the scalar unit orders safely

template <class L, class T>
struct SelectTensors {
  typename L::template Global<T> q, c1, c2;
  typename L::template Global<int32_t> positions, c1Table, c2Table, selected;
};

template <class L, class T>
class BlockSelect {
  template <class E>
  using Local = typename L::template Local<E>;

 public:
  ASC_DEVICE void Init(typename L::Pipe &pipe, const infllm_tiling::SelectTiling &t, const SelectTensors<L, T> &g) {
    t_ = t, g_ = g, group_ = infllm_tiling::Group(t);
    const int64_t d = t.headDim, j = t.chunk;
    qIn_ = arena_.template Get<T>(pipe, group_ * d, "q_in");
    qf_ = arena_.template Get<float>(pipe, group_ * d, "q_f32");
    L::InitQueue(pipe, keysIn_, 2, j * d, "keys_in");
    kf_ = arena_.template Get<float>(pipe, j * d, "keys_f32");
    keyCols_ = arena_.template Get<float>(pipe, j * d, "k_cols");
    offsets_ = arena_.template Get<uint32_t>(pipe, j * d, "transpose_offsets");
    dot_ = arena_.template Get<float>(pipe, 8, "dot");
    tiny_ = arena_.template Get<float>(pipe, 8, "tiny");
    work_ = arena_.template Get<float>(pipe, ascendc_hw::ReduceWorkElems(d), "work");
    chunk_ = arena_.template Get<float>(pipe, j, "chunk_scores");
    sum_ = arena_.template Get<float>(pipe, j, "chunk_sum");
    norm_ = arena_.template Get<float>(pipe, ascendc_hw::AlignUp(2 * group_, 8), "norm");
    scores_ = arena_.template Get<float>(pipe, ascendc_hw::AlignUp(t.n1, 8), "scores");
    topValues_ = arena_.template Get<float>(pipe, ascendc_hw::AlignUp(t.topk, 8), "top_values");
    topBlocks_ = arena_.template Get<int32_t>(pipe, ascendc_hw::AlignUp(t.topk, 8), "top_blocks");
    selected_ = arena_.template Get<int32_t>(pipe, ascendc_hw::AlignUp(t.blocks, 8), "selected");
    ascendc_helpers::TransposeOffsets<L>(offsets_, j, d);
  }

  ASC_DEVICE void Process(int64_t core) {
    const auto units = ascendc_tiling::CoreUnits(t_.batch * t_.kvHeads * t_.queries, t_.coreNum, core);
    int64_t row = -1, length = 0;
    for (int64_t u = units.begin; u < units.end; ++u) {
      const int64_t b = u / (t_.kvHeads * t_.queries), h = u / t_.queries % t_.kvHeads, i = u % t_.queries;
      if (b != row) row = b, length = RowLength(b);
      Unit(b, h, i, length, u);
    }
  }

  template <class F>
  void ForEachQueue(F f) {  // the emulation checks every queue is idle at the end
    f(keysIn_);
  }

 private:
  ASC_DEVICE int64_t RowLength(int64_t b) {  // the row's total length: its last position + 1
    int64_t last = -1;
    for (int64_t i = 0; i < t_.queries; ++i) {
      const int64_t p = g_.positions.GetValue(b * t_.queries + i);
      last = p > last ? p : last;
    }
    return last + 1;
  }

  ASC_DEVICE void Unit(int64_t b, int64_t h, int64_t i, int64_t length, int64_t unit) {
    const int64_t pos = g_.positions.GetValue(b * t_.queries + i), nb = t_.blocks;
    L::VectorToCopyIn(selected_);
    L::CopyOutDone(selected_);
    L::Duplicate(selected_, int32_t(0), nb);
    L::VectorToScalar(selected_);
    if (pos >= 0) {
      const int64_t qb = pos / kBlock;
      if (t_.denseLen >= 0 && length < t_.denseLen) {
        for (int64_t blk = 0; blk <= qb && blk < nb; ++blk) selected_.SetValue(blk, 1);
      } else {
        Score(b, h, i, pos, length);
        Choose(qb, length);
      }
    }
    L::ScalarToCopyOut(selected_);
    L::CopyOutPad(g_.selected[unit * nb], selected_, nb);
  }

  // scores_[j] for every C1 entry j: the group's summed P (0 when not visible; kNone past the row).
  ASC_DEVICE void Score(int64_t b, int64_t h, int64_t i, int64_t pos, int64_t length) {
    const int64_t d = t_.headDim;
    L::VectorToCopyIn(qIn_);
    L::CopyIn(qIn_, g_.q[((b * t_.queries + i) * t_.qHeads + h * group_) * d], group_ * d);
    L::WaitCopyIn(qIn_);
    L::Cast(qf_, qIn_, group_ * d);
    L::VectorToScalar(qf_);
    const int64_t vis1 = Visible(pos, kKernel1, kStride1, t_.n1), vis2 = Visible(pos, kKernel2, kStride2, t_.n2);
    const int64_t exist1 = length >= kKernel1 ? Min((length - kKernel1) / kStride1 + 1, t_.n1) : 0;
    const bool current = t_.current != 0;
    // Pass 1, the normaliser per head: over the visible C2 entries (V-new) or C1 entries (V-old).
    const bool any = current ? vis2 > 0 : vis1 > 0;
    if (any) Normaliser(current ? g_.c2 : g_.c1, current ? g_.c2Table[b * t_.n2] : g_.c1Table[b * t_.n1],
                        current ? vis2 : vis1, h);
    // Pass 2: sum over the group of exp(s1 - max) / sum, times the repeat-to-16 factor.
    for (int64_t j0 = 0; any && j0 < vis1; j0 += t_.chunk) {
      const int64_t m = Min(t_.chunk, vis1 - j0);
      LoadKeys(g_.c1, g_.c1Table[b * t_.n1 + j0], m, h);
      L::Duplicate(sum_, 0.f, m);
      for (int64_t g = 0; g < group_; ++g) {
        Dots(g);
        L::Adds(chunk_, chunk_, -norm_.GetValue(2 * g), m);
        L::Exp(chunk_, chunk_, m);
        L::Axpy(sum_, chunk_, norm_.GetValue(2 * g + 1), m);
      }
      L::Muls(scores_[j0], sum_, t_.repeat, m);
    }
    L::VectorToScalar(scores_);
    for (int64_t j = any ? vis1 : 0; j < t_.n1; ++j) scores_.SetValue(j, j < exist1 ? 0.f : kNone);
    L::ScalarToVector(scores_);
  }

  // norm_[2g] = running max, norm_[2g+1] = 1 / running sum of exp(s - max), over n entries.
  ASC_DEVICE void Normaliser(const typename L::template Global<T> &cache,
                             const typename L::template Global<int32_t> &table, int64_t n, int64_t h) {
    L::VectorToScalar(norm_);
    for (int64_t g = 0; g < group_; ++g) norm_.SetValue(2 * g, kNone), norm_.SetValue(2 * g + 1, 0.f);
    for (int64_t j0 = 0; j0 < n; j0 += t_.chunk) {
      const int64_t m = Min(t_.chunk, n - j0);
      LoadKeys(cache, table[j0], m, h);
      for (int64_t g = 0; g < group_; ++g) {
        Dots(g);
        L::ReduceMax(dot_, chunk_, work_, m);
        L::VectorToScalar(dot_);
        const float old = norm_.GetValue(2 * g), top = Max(old, dot_.GetValue(0));
        L::Adds(chunk_, chunk_, -top, m);
        L::Exp(chunk_, chunk_, m);
        L::ReduceSum(dot_, chunk_, work_, m);
        L::VectorToScalar(dot_);
        const float rescale = old == kNone ? 0.f : ascendc_helpers::ScalarExp<L>(tiny_, old - top);
        norm_.SetValue(2 * g, top), norm_.SetValue(2 * g + 1, norm_.GetValue(2 * g + 1) * rescale + dot_.GetValue(0));
      }
    }
    for (int64_t g = 0; g < group_; ++g) norm_.SetValue(2 * g + 1, 1.f / norm_.GetValue(2 * g + 1));
  }

  // kf_ = m compressed keys of KV head h, entries table[0..m), widened to fp32.
  ASC_DEVICE void LoadKeys(const typename L::template Global<T> &cache,
                           const typename L::template Global<int32_t> &table, int64_t m, int64_t h) {
    const int64_t d = t_.headDim;
    Local<T> raw = keysIn_.AllocTensor();
    for (int64_t j = 0; j < m; ++j) L::CopyIn(raw[j * d], cache[(table.GetValue(j) * t_.kvHeads + h) * d], d);
    keysIn_.EnQue(raw);
    raw = keysIn_.DeQue();
    L::Cast(kf_, raw, m * d);
    keysIn_.FreeTensor(raw);
    L::Gather(keyCols_, kf_, offsets_, t_.chunk * d);  // rows past m are stale and never used
  }

  ASC_DEVICE void Dots(int64_t g) {  // chunk_[j] = scale * q_g . k_j
    ascendc_helpers::ScaledScores<L>(chunk_, qf_[g * t_.headDim], keyCols_, t_.headDim, t_.chunk, t_.scale);
  }

  // Max-pool (kernels 4b-1 .. 4b+3), the forced blocks, then top-k (ties to the lower block).
  ASC_DEVICE void Choose(int64_t qb, int64_t length) {
    const bool current = t_.current != 0;
    const int64_t nb = t_.blocks, k = Min(Min(t_.topk, (length + kBlock - 1) / kBlock), nb);
    int64_t count = 0;
    for (int64_t blk = 0; blk < nb; ++blk) {
      float v = kNone;
      for (int64_t j = Max<int64_t>(4 * blk - 1, 0); j <= Min(4 * blk + 3, t_.n1 - 1); ++j) v = Max(v, scores_.GetValue(j));
      const bool local = current ? (blk >= qb - t_.windowBlocks && blk <= qb) : (blk > qb - t_.windowBlocks && blk <= qb);
      if (blk < t_.initBlocks) v = kForced;
      else if (local) v = current ? kForced : kNone;
      if (count == k && !(v > topValues_.GetValue(k - 1))) continue;
      int64_t at = count < k ? count : k - 1;  // a full list drops its last entry
      for (; at > 0 && topValues_.GetValue(at - 1) < v; --at) {
        topValues_.SetValue(at, topValues_.GetValue(at - 1));
        topBlocks_.SetValue(at, topBlocks_.GetValue(at - 1));
      }
      topValues_.SetValue(at, v), topBlocks_.SetValue(at, int32_t(blk));
      count += count < k ? 1 : 0;
    }
    for (int64_t r = 0; r < count; ++r) {
      const int64_t blk = topBlocks_.GetValue(r);
      if (current ? blk <= qb : blk < qb) selected_.SetValue(blk, 1);
    }
    if (!current)  // V-old: stage 2 adds the local window itself
      for (int64_t blk = Max<int64_t>(qb - t_.windowBlocks + 1, 0); blk <= qb && blk < nb; ++blk) selected_.SetValue(blk, 1);
  }

  ASC_DEVICE static int64_t Visible(int64_t pos, int64_t kernel, int64_t stride, int64_t n) {
    return pos >= kernel - 1 ? Min((pos - kernel + 1) / stride + 1, n) : 0;
  }

  typename L::Arena arena_;
  infllm_tiling::SelectTiling t_;
  SelectTensors<L, T> g_;
  int64_t group_ = 1;
  typename L::template QueIn<T> keysIn_;
  Local<T> qIn_;
  Local<float> qf_, kf_, keyCols_, dot_, tiny_, work_, chunk_, sum_, norm_, scores_, topValues_;
  Local<uint32_t> offsets_;
  Local<int32_t> topBlocks_, selected_;
};

}  // namespace infllm_kernel
