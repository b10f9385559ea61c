// Linear layers over weights kept quantized (weight-only: W8A16 / W4A16 / ternary W2A16): the
// codes are unpacked and dequantized in registers, inside the GEMV (decode) and GEMM (prefill).
//   x: [M, K] fp32   y: fp32
//   packed  [N, K * bits / 8] uint8   bits 8, 4 or 2, from the row width; codes c are unsigned
//   scales  [N, K / G] fp32 | fp16 | bf16   one per group of G consecutive inputs (G = K: per channel)
//   offsets [N, K / G] the scales' dtype: w = s * c + m (asymmetric, GGUF Q4_1),
//           or [1] (any dtype): w = s * (c - 2^(bits-1)) (symmetric, GGUF Q8_0 / Q4_0, ternary)
// Code layouts along a row (the 4-bit one is GGUF's Q4_0/Q4_1 block, so those keep their bytes):
//   8-bit  byte k = c[k]
//   4-bit  per 32 inputs, 16 bytes: byte j = c[j] | c[j + 16] << 4
//   2-bit  per 32 inputs, 8 bytes:  byte j = c[j] | c[j + 8] << 2 | c[j + 16] << 4 | c[j + 24] << 6
// 4- and 2-bit groups are multiples of 32 inputs; 8-bit groups any length.
// Entry points (MindSpore AOT signature, inputs then output):
//   QuantLinear(x, packed, scales, offsets, y)                   y = x W^T                 [M, N]
//   QuantLinearSwiglu(x, packed, scales, offsets, y)             W = gate|up (2I rows)     [M, I]
//   QuantLinearResidual(x, packed, scales, offsets, r, scale, y) y = r + scale[0] x W^T    [M, N]
//   QuantRmsNormLinear(x, g, eps, packed, scales, offsets, y)    y = rmsnorm(x) W^T        [M, N]
//   QuantRmsNormLinearSwiglu(x, g, eps, packed, scales, offsets, y)  SwiGLU of rmsnorm(x)  [M, I]
//     rmsnorm(x) = x / sqrt(mean(x^2) + eps[0]) * g (the norm before q|k|v and gate|up, fused)
//   QuantRmsNormSwigluMlp(x, g, eps, gate|up weight x 3, down weight x 3, r, scale, y)
//                                       y = r + scale[0] swiglu(rmsnorm(x) Wgu^T) Wd^T   [M, K]
//   QuantRmsNormAttentionBlock(x, g, eps, q|k|v weight x 3, cos, sin, positions, slot_mapping,
//                              block_tables, k_cache, v_cache, meta, o weight x 3, r, scale, y)
//                                       y = r + scale[0] attention(rmsnorm(x) Wqkv^T) Wo^T  [M, K]
//     attention: RoPE, the KV-cache write and causal paged attention, as RopePagedAttention
//     (kernels_aclnn/paged_attention/cpu.cc documents those inputs)
//   QuantRmsNormDecoderLayer(x, the attention block's inputs g .. o weight x 3, scale, g2, eps2,
//                            gate|up weight x 3, down weight x 3, y)
//                                       a whole pre-norm layer: the attention block (r = x), then
//                                       the MLP block on its output                        [M, K]
// The instruction set is chosen at run time: AVX-512 VNNI (with VL and BW), else AVX-512F, else
// AVX2+FMA, else scalar; the environment variable MINDCPM_QUANT_ISA=scalar|avx2|avx512|avx512vnni
// (or QuantLinearSetIsa) picks a narrower one. Decode (fewer than kGemmRows rows of x) on the SIMD
// paths multiplies 4- and 8-bit codes by x rounded to int16 per 32 inputs (vpmaddwd, or VNNI's
// vpdpwssd, or for 4-bit codes on zmm vpdpbusd on x's bytes; the error bound is in
// quant_gemv.inc); prefill and batched decode do too unless
// MINDCPM_QUANT_GEMM=fp32 (or QuantLinearSetGemm) asks for fp32 x, which the scalar path always
// keeps. The AVX-512 paths run the int16 products on ymm, but VNNI's decode on zmm; there is no
// AMX path.
// Built with -DMINDCPM_EMULATE_AVX512 (tests only, on CPUs without AVX-512), the AVX-512 paths
// take their intrinsics from SIMDe's portable implementations, so their text is checked against
// the scalar path on any x86-64 with AVX2 (tests/quant/test_emulated_isas.py).
#include "../common/gemv.h"
#include "../common/paged_attention.h"
#include "../common/vec.h"

#include <immintrin.h>
#ifdef MINDCPM_EMULATE_AVX512
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
// The one intrinsic used here that SIMDe 0.8 lacks: 16 bytes zero-extended to 16 int32 lanes.
inline simde__m512i emulated_cvtepu8_epi32(__m128i a) {
  return simde_mm512_inserti64x4(simde_mm512_castsi256_si512(_mm256_cvtepu8_epi32(a)),
                                 _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(a, a)), 1);
}
#define _mm512_cvtepu8_epi32 emulated_cvtepu8_epi32
#endif

#include <limits>
#include <type_traits>

using namespace mindcpm;

namespace {

// Code of input k of a packed row (the layouts above).
template <int Bits>
inline unsigned code(const uint8_t *row, int64_t k) {
  if (Bits == 8) return row[k];
  if (Bits == 4) {
    const uint8_t b = row[(k >> 5) * 16 + (k & 15)];
    return (k & 16) ? b >> 4 : b & 15;
  }
  return (row[(k >> 5) * 8 + (k & 7)] >> (2 * ((k >> 3) & 3))) & 3;
}

// One quantized weight: row r's codes, and its scales and offsets (w = s c + offset, or
// w = s (c - center) when offsets is null), of type stype, one per group of G inputs.
struct QWeight {
  const uint8_t *packed;
  const void *scales, *offsets;
  WType stype;
  int64_t K, G, groups, row_bytes;
  float center;
  const uint8_t *codes(int64_t r) const { return packed + r * row_bytes; }
};

// Where the dot products of a tile go: y = acc (plain), y = r + scale acc (residual), or
// y = silu(gate) up (SwiGLU: a unit is 2 weight rows, gate row u and up row units + u).
struct Epilogue {
  enum Kind { kPlain, kResidual, kSwiglu } kind;
  float *y;
  int64_t ldy;
  const float *r;
  float scale;
  int rows_per_unit() const { return kind == kSwiglu ? 2 : 1; }
  // acc[i * 4 + j]: x row m + i against weight row j of units ids[0..n) (all gate rows first).
  void store(int64_t m, int MR, const int64_t *ids, int n, const float *acc) const {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < n; ++j) {
        const int64_t o = (m + i) * ldy + ids[j];
        const float a = acc[i * 4 + j];
        y[o] = kind == kPlain ? a : kind == kResidual ? r[o] + scale * a : gemv::silu(a) * acc[i * 4 + n + j];
      }
  }
};

// The arguments of an entry point, checked: which one is wrong is the error code.
struct Problem {
  const float *x;
  QWeight w;
  int64_t M, N;
};

enum Error { kOk = 0, kBadX = 10, kBadPacked = 11, kBadScales = 12, kBadOffsets = 13, kBadNorm = 14, kBadOther = 15 };

// The weight of K inputs in inputs w (packed), w + 1 (scales), w + 2 (offsets); N its rows.
int parse_weight(void **params, int *ndims, int64_t **shapes, const char **dtypes, int w, int64_t K, QWeight *q,
                 int64_t *N) {
  if (std::strcmp(dtypes[w], "uint8") != 0 || ndims[w] != 2 || K <= 0) return kBadPacked;
  *N = shapes[w][0];
  const int64_t width = shapes[w][1], bits = width * 8 % K == 0 ? width * 8 / K : 0;
  if ((bits != 8 && bits != 4 && bits != 2) || (bits < 8 && K % 32 != 0)) return kBadPacked;
  const int64_t groups = ndims[w + 1] == 2 ? shapes[w + 1][1] : 0;
  const WType stype = weight_type(dtypes[w + 1]);
  if (stype == WType::kOther || groups <= 0 || shapes[w + 1][0] != *N || K % groups != 0 ||
      (bits < 8 && K / groups % 32 != 0))
    return kBadScales;
  const bool symmetric = ndims[w + 2] == 1 && shapes[w + 2][0] == 1;  // offsets [1]: none
  if (!symmetric && (std::strcmp(dtypes[w + 2], dtypes[w + 1]) != 0 || ndims[w + 2] != 2 ||
                     shapes[w + 2][0] != *N || shapes[w + 2][1] != groups))
    return kBadOffsets;
  *q = {static_cast<const uint8_t *>(params[w]), params[w + 1], symmetric ? nullptr : params[w + 2], stype, K,
        K / groups, groups, width, float(1 << (bits - 1))};
  return kOk;
}

// x is input 0 [..., K]; the weight is inputs w, w + 1, w + 2.
int parse(void **params, int *ndims, int64_t **shapes, const char **dtypes, int w, Problem *p) {
  if (std::strcmp(dtypes[0], "float32") != 0 || ndims[0] < 1) return kBadX;
  const int64_t K = shapes[0][ndims[0] - 1];
  p->M = numel(ndims[0], shapes[0]) / std::max<int64_t>(K, 1);
  p->x = static_cast<const float *>(params[0]);
  return parse_weight(params, ndims, shapes, dtypes, w, K, &p->w, &p->N);
}

// Lanes of a group term: a vector of the widest instruction set with the term in lane 0, so
// that the fused tile starts a group's dot product from it (its other lanes are 0).
constexpr int kTermLanes = 16;

// Per row of x and group of the weight, the group's term: the offsets multiply the sum of x over
// the group (asymmetric); without offsets the codes' center does, -center * that sum.
const float *group_terms(const float *x, int64_t M, const QWeight &w) {
  thread_local std::vector<float> terms;
  terms.assign(M * w.groups * kTermLanes, 0.f);
  const float factor = w.offsets ? 1.f : -w.center;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < w.groups; ++g) {
      float s = 0.f;
      for (int64_t k = g * w.G; k < (g + 1) * w.G; ++k) s += x[m * w.K + k];
      terms[(m * w.groups + g) * kTermLanes] = factor * s;
    }
  return terms.data();
}

}  // namespace

// Rows of x from which the weight rows are dequantized to fp32 once and multiplied by gemv's
// fp32 tiles (prefill); below, each row of x takes the fused tile (decode).
constexpr int64_t kGemmRows = 4;

// -- the paths, one per instruction set, from the same source ---------------------------------------
namespace scalar_isa {
struct V {
  using F = float;
  static constexpr int L = 1;
  using Dot = void;  // the reference: fp32 activations throughout
  using WideDot = void;
  static F zero() { return 0.f; }
  static F set1(float v) { return v; }
  static F load(const float *p) { return *p; }
  static void store(float *p, F v) { *p = v; }
  static F fmadd(F a, F b, F c) { return a * b + c; }
  static float hsum(F v) { return v; }
  template <class S> static void widen(const typename S::T *p, int64_t n, float *out) {
    for (int64_t i = 0; i < n; ++i) out[i] = S::get(p + i);
  }
  template <int Bits> static F codes(const uint8_t *row, int64_t k) { return (float)code<Bits>(row, k); }
  template <int Bits> static F vec(const uint8_t *row, int64_t k, int v) { return (float)code<Bits>(row, k + v); }
};
#include "../common/quant_gemv.inc"
}  // namespace scalar_isa

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2_isa {
// The integer dot products of the int16-activation decode path (quant_gemv.inc): a step is 32
// bytes of codes (4-bit: two 32-input blocks; 8-bit: one) against 32 or 64 int16 inputs laid out
// by slot(), each product pair summed by vpmaddwd into 8 int32 lanes (4-bit: lanes 0-3 block 0,
// 4-7 block 1). The codes are split into 16-bit lanes by and/shift only, no shuffles: the
// activations are permuted to match instead, once a call. Used by the AVX-512 path too (ymm).
struct Int16Dot {
  using F = __m256;
  static constexpr int L = 8;  // int32 lanes of a step's sums
  template <int Bits> static constexpr int blocks() { return Bits == 4 ? 2 : 1; }
  // Where input kk of a block (block h of its step) goes among the step's int16 inputs.
  // 8-bit: word i of the codes is bytes 2i, 2i+1: even inputs then odd ones. 4-bit: word i of
  // half h is bytes 2i, 2i+1 of block h, holding inputs 2i, 2i+16 (byte 2i) and 2i+1, 2i+17.
  template <int Bits> static int64_t slot(int64_t h, int64_t kk) {
    if (Bits == 8) return (kk & 1) * 16 + (kk >> 1);
    return ((kk & 1) | ((kk >> 4) & 1) << 1) * 16 + h * 8 + ((kk & 15) >> 1);
  }
  // A step's x^ once all its blocks are rounded: kept as round_block wrote it (Vnni512Dot's
  // 4-bit steps are rewritten as bytes).
  template <int Bits> static void split_step(int16_t *) {}
  // One block of 32 inputs x rounded to int16, x^ = d round(x / d) with d = max|x| / 32767, input kk
  // into q[slot(kk)]; returns the sum of the rounded values, d in *d.
  template <class Slot> static int round_block(const float *x, Slot slot, int16_t *q, float *d) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 v[4], mx = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float m = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4))), inv = m > 0.f ? 32767.f / m : 0.f;
    // A NaN input makes d NaN, so the outputs are NaN as with fp32 x (an infinite one: 0 * inf).
    *d = _mm256_movemask_ps(nan) ? std::numeric_limits<float>::quiet_NaN() : m / 32767.f;
    alignas(32) int32_t r[32];
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {  // round to nearest even (MXCSR's default)
      const __m256i ri = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
      _mm256_store_si256(reinterpret_cast<__m256i *>(r + 8 * i), ri);
      sum = _mm256_add_epi32(sum, ri);
    }
    for (int kk = 0; kk < 32; ++kk) q[slot(kk)] = (int16_t)r[kk];
    const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xb1)));
  }
  // vpmaddwd with x read from memory (L1) by the instruction itself, as asm: from intrinsics GCC
  // loads a step's x once into four registers for all the tile's rows, which spills the
  // accumulators around every group.
  static __m256i madd(__m256i a, const int16_t *x) {
    __m256i r;
    __asm__("vpmaddwd %1, %2, %0" : "=x"(r) : "m"(*reinterpret_cast<const __m256i *>(x)), "x"(a));
    return r;
  }
  // A step's int32 sums; `half`: a lone last 4-bit block, only its 16 bytes read.
  template <int Bits> static F dot(const uint8_t *codes, const int16_t *x, bool half) {
    const __m256i v = half ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(codes)))
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i *>(codes));
    if (Bits == 8) {
      const __m256i even = _mm256_and_si256(v, _mm256_set1_epi16(0xff)), odd = _mm256_srli_epi16(v, 8);
      return _mm256_cvtepi32_ps(_mm256_add_epi32(madd(even, x), madd(odd, x + 16)));
    }
    const __m256i m = _mm256_set1_epi16(15);
    const __m256i lo_even = _mm256_and_si256(v, m), lo_odd = _mm256_and_si256(_mm256_srli_epi16(v, 8), m);
    const __m256i hi_even = _mm256_and_si256(_mm256_srli_epi16(v, 4), m), hi_odd = _mm256_srli_epi16(v, 12);
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_add_epi32(madd(lo_even, x), madd(lo_odd, x + 16)),
                                               _mm256_add_epi32(madd(hi_even, x + 32), madd(hi_odd, x + 48))));
  }
  // The weight's scales (and offsets) are read in their own dtype S where the tiles use them:
  // widening a row's first (row_scales) waits on its cache miss before the tile starts.
  template <class S> static float scale(const typename S::T *p) {
    if constexpr (std::is_same<S, F16>::value) return _cvtsh_ss(*p);
    else return S::get(p);
  }
  // P consecutive scales of type S (2 or 4) as fp32, in the low lanes.
  template <class S, int P> static __m128 first_scales(const typename S::T *s) {
    static_assert(P == 2 || P == 4, "two or four groups a step");
    if constexpr (std::is_same<S, F32>::value) {
      return P == 4 ? _mm_loadu_ps(s) : _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double *>(s)));
    } else {
      __m128i h;
      if constexpr (P == 4) {
        h = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(s));
      } else {
        int32_t both;  // the two 16-bit scales
        std::memcpy(&both, s, sizeof both);
        h = _mm_cvtsi32_si128(both);
      }
      if constexpr (std::is_same<S, F16>::value) return _mm_cvtph_ps(h);
      else return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
    }
  }
  // Lane scales of a step holding P groups, each group's scale in its blocks' lanes: here 4-bit
  // groups of 32, the step's two blocks' own.
  template <class S, int P> static F step_scales(const typename S::T *s) {
    static_assert(P == 2, "a step holds two blocks");
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(first_scales<S, 2>(s)), _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0));
  }
  // 8 values of type S as fp32.
  template <class S> static F load8(const typename S::T *p) {
    if constexpr (std::is_same<S, F32>::value) {
      return _mm256_loadu_ps(p);
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i *>(p));
      if constexpr (std::is_same<S, F16>::value) return _mm256_cvtph_ps(h);
      else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
  // sum_g s_g sums_g over n groups.
  template <class S> static float scaled_sum(const typename S::T *s, const float *sums, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= n; g += 8) acc = _mm256_fmadd_ps(load8<S>(s + g), _mm256_loadu_ps(sums + g), acc);
    float total = mindcpm::hsum(acc);
    for (; g < n; ++g) total += scale<S>(s + g) * sums[g];
    return total;
  }
  // The GEMM's integer layer (quant_gemv.inc, int_gemm_tile): a span is 8 blocks of 32 inputs
  // as 16 vectors of int16, vector t holding inputs 2t, 2t+1 of block l in int32 lane l, so a
  // lane's sums stay within one block (one scale of x, one of the weight) across the span.
  using I = __m256i;
  static constexpr int kTileRows = 2;  // rows of x a GEMM tile (quant_gemv.inc, int_gemm_block)
  static I izero() { return _mm256_setzero_si256(); }
  static I iload(const int16_t *p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)); }
  // acc += vpmaddwd(x, w), written as asm so that GCC keeps each accumulator in one register and
  // x, w in registers: from intrinsics it folds every load into each vpmaddwd using it (the
  // loads, two 256-bit a cycle, then bound the tile) or, kept in registers, spills an accumulator.
  static I madd_add(I acc, I x, I w) {
    I product;
    __asm__("vpmaddwd %2, %3, %1\n\tvpaddd %1, %0, %0" : "+x"(acc), "=&x"(product) : "x"(w), "x"(x));
    return acc;
  }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  // Where input kk of block l of a span goes among its 256 int16.
  static int64_t span_slot(int64_t l, int64_t kk) { return (kk >> 1) * 16 + 2 * l + (kk & 1); }
  // A span's codes (8 blocks from `codes`: 32 bytes a block 8-bit, 16 4-bit) minus their center,
  // as int16 in span_slot order: each block's 16 code pairs (words) become a row of an 8 x 16
  // word matrix, transposed in 128-bit halves (pairs 0-7 | 8-15), then sign-extended.
  template <int Bits> static void widen_span(const uint8_t *codes, int16_t *out) {
    __m256i b[8];
    if (Bits == 8) {  // c - 128 as int8 is c with its top bit flipped
      for (int l = 0; l < 8; ++l)
        b[l] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(codes + 32 * l)),
                                _mm256_set1_epi8(-128));
    } else {  // two blocks a load; a block's low nibbles are its codes 0-15, the high ones 16-31
      const __m256i nibble = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8);
      for (int l = 0; l < 8; l += 2) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(codes + 16 * l));
        const __m256i lo = _mm256_sub_epi8(_mm256_and_si256(v, nibble), eight);
        const __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), eight);
        b[l] = _mm256_permute2x128_si256(lo, hi, 0x20), b[l + 1] = _mm256_permute2x128_si256(lo, hi, 0x31);
      }
    }
    __m256i s[8], u[8];
    for (int l = 0; l < 8; l += 2)
      s[l] = _mm256_unpacklo_epi16(b[l], b[l + 1]), s[l + 1] = _mm256_unpackhi_epi16(b[l], b[l + 1]);
    for (int h = 0; h < 8; h += 4)
      for (int i = 0; i < 2; ++i) {
        u[h + 2 * i] = _mm256_unpacklo_epi32(s[h + i], s[h + i + 2]);
        u[h + 2 * i + 1] = _mm256_unpackhi_epi32(s[h + i], s[h + i + 2]);
      }
    for (int c = 0; c < 8; ++c) {  // pair c of every block: low half, pair c + 8: high half
      const __m256i o = c & 1 ? _mm256_unpackhi_epi64(u[c / 2], u[c / 2 + 4]) : _mm256_unpacklo_epi64(u[c / 2], u[c / 2 + 4]);
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + 16 * c), _mm256_cvtepi8_epi16(_mm256_castsi256_si128(o)));
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + 16 * (c + 8)),
                          _mm256_cvtepi8_epi16(_mm256_extracti128_si256(o, 1)));
    }
  }
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float *p) { return _mm256_loadu_ps(p); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(F v) { return mindcpm::hsum(v); }
};

struct V {
  using F = __m256;
  static constexpr int L = 8;
  using Dot = Int16Dot;
  using WideDot = Int16Dot;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float *p) { return _mm256_loadu_ps(p); }
  static void store(float *p, F v) { _mm256_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  template <class S> static void widen(const typename S::T *p, int64_t n, float *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, Int16Dot::load8<S>(p + i));
    for (; i < n; ++i) out[i] = S::get(p + i);
  }
  static __m128i load8(const uint8_t *p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i *>(p)); }
  static __m256i bytes8(const uint8_t *p) { return _mm256_cvtepu8_epi32(load8(p)); }
  template <int Bits> static F codes(const uint8_t *row, int64_t k) { return _mm256_cvtepi32_ps(bytes8(row + k)); }
  // Bytes are widened to 32-bit lanes straight from memory, then split into nibbles / bit pairs
  // there: fewer shuffles than splitting bytes first. 8-bit: 8 bytes a vector. 4-bit: bytes 0-7
  // and 8-15 of the block, low nibbles (codes 0-15) then high (16-31). 2-bit: the block's 8
  // bytes, bit pair v (codes 8v..8v+7). A block's bytes are loaded once a vector: L1 hits.
  template <int Bits> static F vec(const uint8_t *row, int64_t k, int v) {
    if (Bits == 8) return _mm256_cvtepi32_ps(bytes8(row + k + 8 * v));
    if (Bits == 4) {
      const __m256i b = bytes8(row + (k >> 5) * 16 + 8 * (v & 1));
      return _mm256_cvtepi32_ps(v < 2 ? _mm256_and_si256(b, _mm256_set1_epi32(15)) : _mm256_srli_epi32(b, 4));
    }
    const __m256i b = _mm256_srli_epi32(bytes8(row + (k >> 5) * 8), 2 * v);
    return _mm256_cvtepi32_ps(v < 3 ? _mm256_and_si256(b, _mm256_set1_epi32(3)) : b);
  }
};
#include "../common/quant_gemv.inc"
}  // namespace avx2_isa
#pragma GCC pop_options

#ifndef MINDCPM_EMULATE_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma,f16c")
#endif
namespace avx512_isa {
struct V {
  using F = __m512;
  static constexpr int L = 16;
  using Dot = avx2_isa::Int16Dot;  // 16-bit integer lanes of zmm need AVX-512BW; ymm ones do not
  using WideDot = avx2_isa::Int16Dot;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float *p) { return _mm512_loadu_ps(p); }
  static void store(float *p, F v) { _mm512_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(F v) {
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return avx2_isa::V::hsum(_mm256_add_ps(_mm512_castps512_ps256(v), high));
  }
  template <class S> static void widen(const typename S::T *p, int64_t n, float *out) {
    avx2_isa::V::widen<S>(p, n, out);  // scales are widened once a row: not worth 16 lanes
  }
  template <int Bits> static F codes(const uint8_t *row, int64_t k) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(row + k))));
  }
  // As AVX2's, 16 codes a vector. 2-bit: the block's 8 bytes in both halves, shifted by bit
  // pairs 0 | 1 (codes 0-15) and 2 | 3 (codes 16-31).
  template <int Bits> static F vec(const uint8_t *row, int64_t k, int v) {
    if (Bits == 8) return codes<8>(row, k + 16 * v);
    if (Bits == 4) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(row + (k >> 5) * 16)));
      return _mm512_cvtepi32_ps(v == 0 ? _mm512_and_si512(b, _mm512_set1_epi32(15)) : _mm512_srli_epi32(b, 4));
    }
    const __m512i b = _mm512_broadcast_i64x4(avx2_isa::V::bytes8(row + (k >> 5) * 8));
    const __m512i shifts = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_cvtepi32_ps(
        _mm512_and_si512(_mm512_srlv_epi32(b, _mm512_add_epi32(shifts, _mm512_set1_epi32(4 * v))), _mm512_set1_epi32(3)));
  }
};
#include "../common/quant_gemv.inc"
}  // namespace avx512_isa
#ifndef MINDCPM_EMULATE_AVX512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512vnni,avx2,fma,f16c")
#endif

// AVX-512 VNNI: the AVX-512 path with vpdpwssd (multiply int16 pairs, add to int32: one
// instruction for AVX2's vpmaddwd + vpaddd), the GEMM on ymm with AVX-512VL's encoding, decode on
// zmm where the weight allows (Vnni512Dot).
namespace avx512vnni_isa {
// A step's int32 sums of codes v against x, for the ymm and zmm dots (D: VnniDot, Vnni512Dot; W
// int16 a vector): 16-bit lanes split from the codes by and/shift, the products in one chain of
// vpdpwssd, no add to join two (the rows of a tile are independent chains; 4-bit decode
// 1.03-1.2x two chains, benchmarks/quant_gemv.py).
template <int Bits, class D>
inline typename D::F codes_dot(typename D::I v, const int16_t *x) {
  using I = typename D::I;
  constexpr int W = D::kWords;
  const I zero = D::izero();
  if (Bits == 8) {
    const I even = D::band(v, D::words(0xff)), odd = D::template shr<8>(v);
    return D::cvt(D::dpwssd(D::dpwssd(zero, even, x), odd, x + W));
  }
  const I m = D::words(15);
  const I lo_even = D::band(v, m), lo_odd = D::band(D::template shr<8>(v), m);
  const I hi_even = D::band(D::template shr<4>(v), m), hi_odd = D::template shr<12>(v);
  return D::cvt(D::dpwssd(D::dpwssd(D::dpwssd(D::dpwssd(zero, lo_even, x), hi_even, x + 2 * W), lo_odd, x + W),
                          hi_odd, x + 3 * W));
}

struct VnniDot : avx2_isa::Int16Dot {
  using I = __m256i;
  static constexpr int kTileRows = 4;  // 4 x 4 tiles: 16 accumulators of 32 registers (measured 1.1x 2 x 4's)
  static I dpwssd(I acc, I a, const int16_t *x) {
    return _mm256_dpwssd_epi32(acc, a, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x)));
  }
  static constexpr int kWords = 16;
  static I band(I a, I b) { return _mm256_and_si256(a, b); }
  static I words(int16_t w) { return _mm256_set1_epi16(w); }
  template <int N> static I shr(I v) { return _mm256_srli_epi16(v, N); }
  // As Int16Dot::dot, on vpdpwssd (codes_dot).
  template <int Bits> static F dot(const uint8_t *codes, const int16_t *x, bool half) {
    const I v = half ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(codes)))
                     : _mm256_loadu_si256(reinterpret_cast<const __m256i *>(codes));
    return codes_dot<Bits, VnniDot>(v, x);
  }
  // acc += the pair products of x and w, as asm natively for AVX2's reason (Int16Dot::madd_add):
  // from the intrinsic GCC copies every accumulator between registers each step.
  static I madd_add(I acc, I x, I w) {
#ifdef MINDCPM_EMULATE_AVX512
    return _mm256_dpwssd_epi32(acc, x, w);
#else
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
    return acc;
#endif
  }
};
// Decode's dot products on zmm: a step is 64 bytes of codes (4-bit: four blocks, 8-bit: two)
// against 32 int16 inputs a vector, block h of a 4-bit step in 128-bit quarter h (lanes 4h..4h+3),
// of an 8-bit step in 256-bit half h. Zen 4 splits each zmm instruction into two ymm halves, so
// the multiplies a cycle are the ymm path's (2 vpdpwssd ymm a cycle from registers), but a step
// takes half the instructions, and ymm decode reached only ~30% of that multiply rate: bound by
// instructions and loads. Measured on Zen 4 against ymm steps, all 24 MiniCPM4-0.5B layers from
// DRAM (benchmarks/quant_gemv.py --rows 1 --quant-lib, alternated): int4 g128 1.15x, int8 per
// channel 1.10x. The GEMM stays on VnniDot's ymm spans. Weights whose K or groups do not fit
// these steps (int_path) take VnniDot's decode.
struct Vnni512Dot : avx2_isa::Int16Dot {
  using F = __m512;
  using I = __m512i;
  static constexpr int L = 16;
  template <int Bits> static constexpr int blocks() { return Bits == 4 ? 4 : 2; }
  // 8-bit: as Int16Dot::slot, with vectors of 32 inputs. 4-bit: byte b of the codes' quarter h
  // holds inputs b (low nibble) and b + 16 (high nibble) of block h; x^ goes in that order, the
  // low nibbles' inputs first, and split_step then rewrites it as bytes for dot.
  template <int Bits> static int64_t slot(int64_t h, int64_t kk) {
    if (Bits == 8) return (kk & 1) * 32 + h * 16 + (kk >> 1);
    return (kk >> 4) * 64 + h * 16 + (kk & 15);
  }
  // A 4-bit step's 128 x^ rewritten in place as 128 low bytes l (unsigned), then 128 high bytes
  // h (signed): x^ = 256 h + l. vpdpbusd multiplies unsigned by signed bytes, so the codes (0-15,
  // either) meet l as its signed side and h as its unsigned one, every product exact: the step's
  // sums are vpdpwssd's on x^, with 3 and/shifts a step to split the codes instead of 6 (measured
  // here: the LM head's 73448 x 1024 g128 weight on one thread from DRAM, as it runs while the
  // host works, 1.05x; a 4096 x 1024 one on two threads 1.05x from L3, 1.00-1.03x from DRAM,
  // where memory is the bound).
  template <int Bits> static void split_step(int16_t *q) {
    if (Bits != 4) return;
    __m512i w[4];
    for (int i = 0; i < 4; ++i) w[i] = _mm512_loadu_si512(q + 32 * i);
    uint8_t *bytes = reinterpret_cast<uint8_t *>(q);
    for (int i = 0; i < 4; ++i) {
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(bytes + 32 * i), _mm512_cvtepi16_epi8(w[i]));
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(bytes + 128 + 32 * i),
                          _mm512_cvtepi16_epi8(_mm512_srai_epi16(w[i], 8)));
    }
  }
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float *p) { return _mm512_loadu_ps(p); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(F v) { return avx512_isa::V::hsum(v); }
  static I dpwssd(I acc, I a, const int16_t *x) { return _mm512_dpwssd_epi32(acc, a, _mm512_loadu_si512(x)); }
  static constexpr int kWords = 32;
  static I izero() { return _mm512_setzero_si512(); }
  static I band(I a, I b) { return _mm512_and_si512(a, b); }
  static I words(int16_t w) { return _mm512_set1_epi16(w); }
  template <int N> static I shr(I v) { return _mm512_srli_epi16(v, N); }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  // A step's int32 sums (8-bit: codes_dot). Steps are always whole (int_path).
  template <int Bits> static F dot(const uint8_t *codes, const int16_t *x, bool) {
    I v = _mm512_loadu_si512(codes);
    // One load into a register: GCC would fold it into each of the and/shifts, and four 64-byte
    // loads a step, each taking both load ports, bound the loop (measured 1.0x ymm's).
#ifndef MINDCPM_EMULATE_AVX512
    __asm__("" : "+v"(v));
#endif
    if constexpr (Bits == 4) {  // x as split_step leaves it: l of the low nibbles' inputs, of the high ones', then h
      const uint8_t *xb = reinterpret_cast<const uint8_t *>(x);
      const I m = _mm512_set1_epi8(15), lo = band(v, m), hi = band(shr<4>(v), m);
      const I high = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(izero(), lo, _mm512_loadu_si512(xb + 128)), hi,
                                         _mm512_loadu_si512(xb + 192));
      return cvt(_mm512_dpbusd_epi32(
          _mm512_dpbusd_epi32(_mm512_slli_epi32(high, 8), _mm512_loadu_si512(xb), lo), _mm512_loadu_si512(xb + 64),
          hi));
    }
    return codes_dot<Bits, Vnni512Dot>(v, x);
  }
  // Lane scales of a step holding P groups (2 or 4), each group's in its blocks' lanes.
  template <class S, int P> static F step_scales(const typename S::T *s) {
    const I lane_group = P == 2 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m128 scales = first_scales<S, P>(s);
    return _mm512_permutexvar_ps(lane_group, _mm512_castps128_ps512(scales));
  }
};
struct V : avx512_isa::V {
  using Dot = VnniDot;
  using WideDot = Vnni512Dot;
};
#include "../common/quant_gemv.inc"
}  // namespace avx512vnni_isa
#ifndef MINDCPM_EMULATE_AVX512
#pragma GCC pop_options
#endif

namespace {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3 };
const char *const kIsaNames[] = {"scalar", "avx2", "avx512", "avx512vnni"};
constexpr int kIsas = 4;

Isa best_isa() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#ifdef MINDCPM_EMULATE_AVX512
  if (avx2) return Isa::kAvx512Vnni;  // SIMDe stands in for the AVX-512 instructions
#endif
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni"))
    return Isa::kAvx512Vnni;
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  return avx2 ? Isa::kAvx2 : Isa::kScalar;
}

// The ISA named `name` if this CPU has it, else -1.
int isa_named(const char *name) {
  for (int i = 0; i < kIsas; ++i)
    if (std::strcmp(name, kIsaNames[i]) == 0) return i <= (int)best_isa() ? i : -1;
  return -1;
}

std::atomic<int> &chosen_isa() {
  static std::atomic<int> isa([] {
    const char *env = std::getenv("MINDCPM_QUANT_ISA");
    const int named = env && *env && std::strcmp(env, "auto") != 0 ? isa_named(env) : -1;
    return named >= 0 ? named : (int)best_isa();
  }());
  return isa;
}

// The activations of the GEMM (kGemmRows rows of x or more) on the SIMD paths: "int16" (the
// default: rounded as decode rounds them, within the bound in quant_gemv.inc; 1.1-1.4x faster),
// or "fp32" (x as it is: only fp32 accumulation order between it and a dense fp32 matmul).
// MINDCPM_QUANT_GEMM=fp32 at start-up, or QuantLinearSetGemm.
const char *const kGemmNames[] = {"fp32", "int16"};

std::atomic<int> &gemm_activations() {
  static std::atomic<int> chosen([] {
    const char *env = std::getenv("MINDCPM_QUANT_GEMM");
    return env && std::strcmp(env, "fp32") == 0 ? 0 : 1;
  }());
  return chosen;
}

// y = epi(x W^T) for M rows of x, on the chosen instruction set.
int execute(const float *x, int64_t M, const QWeight &w, const Epilogue &epi) {
  mindcpm_prefer_huge_pages(w.packed, epi.ldy * epi.rows_per_unit() * w.row_bytes);
  const bool int_gemm = gemm_activations().load(std::memory_order_relaxed) == 1;
  switch ((Isa)chosen_isa().load(std::memory_order_relaxed)) {
    case Isa::kAvx512Vnni: return avx512vnni_isa::run(x, w, M, epi, int_gemm);
    case Isa::kAvx512: return avx512_isa::run(x, w, M, epi, int_gemm);
    case Isa::kAvx2: return avx2_isa::run(x, w, M, epi, int_gemm);
    default: return scalar_isa::run(x, w, M, epi, false);
  }
}

// x normalised with the RMSNorm weight g (input 1) and eps (input 2), in a reused buffer.
int normalise(void **params, int *ndims, int64_t **shapes, const char **dtypes, Problem *p) {
  if (std::strcmp(dtypes[1], "float32") != 0 || std::strcmp(dtypes[2], "float32") != 0 ||
      numel(ndims[1], shapes[1]) != p->w.K)
    return kBadNorm;
  p->x = gemv::rms_normalised(p->x, static_cast<const float *>(params[1]), *static_cast<const float *>(params[2]),
                              p->M, p->w.K);
  return kOk;
}

// The weight is inputs w, w + 1, w + 2; with `norm`, inputs 1 and 2 are the RMSNorm weight g [K]
// and eps [1] applied to x first; params[out] is the output.
int run_problem(void **params, int *ndims, int64_t **shapes, const char **dtypes, int w, bool norm, int out,
                Epilogue epi) {
  Problem p;
  if (int err = parse(params, ndims, shapes, dtypes, w, &p)) return err;
  if (norm)
    if (int err = normalise(params, ndims, shapes, dtypes, &p)) return err;
  epi.y = static_cast<float *>(params[out]);
  epi.ldy = p.N / epi.rows_per_unit();
  if (numel(ndims[out], shapes[out]) != p.M * epi.ldy || p.N % epi.rows_per_unit() != 0) return kBadOther;
  return execute(p.x, p.M, p.w, epi);
}

}  // namespace

// The instruction set in use ("scalar" | "avx2" | "avx512" | "avx512vnni").
extern "C" const char *QuantLinearIsa() { return kIsaNames[chosen_isa().load()]; }

// Uses instruction set `name` from now on ("auto": the best this CPU has); 0 on success,
// 1 when the name is unknown or this CPU lacks it.
extern "C" int QuantLinearSetIsa(const char *name) {
  const int isa = std::strcmp(name, "auto") == 0 ? (int)best_isa() : isa_named(name);
  if (isa < 0) return 1;
  chosen_isa().store(isa);
  return 0;
}

// The GEMM's activations ("fp32" | "int16").
extern "C" const char *QuantLinearGemm() { return kGemmNames[gemm_activations().load()]; }

// Uses GEMM activations `name` ("fp32" | "int16") from now on; 0 on success, 1 for another name.
extern "C" int QuantLinearSetGemm(const char *name) {
  for (int i = 0; i < 2; ++i)
    if (std::strcmp(name, kGemmNames[i]) == 0) return gemm_activations().store(i), 0;
  return 1;
}

namespace {
std::atomic<bool> early_returns{false};  // QuantLinearAllowEarlyReturns

int plain_linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 5) return kBadOther;
  return run_problem(params, ndims, shapes, dtypes, 1, false, 4, {Epilogue::kPlain, nullptr, 0, nullptr, 0.f});
}

// ids[m] = the first index of the largest value of row m of x [M, N] (a NaN counts as the
// largest, as in numpy).
int argmax_rows(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 2 || ndims[0] != 2 || std::strcmp(dtypes[0], "float32") != 0 ||
      std::strcmp(dtypes[1], "int32") != 0 || numel(ndims[1], shapes[1]) != shapes[0][0] || shapes[0][1] < 1)
    return kBadOther;
  const int64_t N = shapes[0][1];
  const float *x = static_cast<const float *>(params[0]);
  int32_t *ids = static_cast<int32_t *>(params[1]);
  parallel_chunks(shapes[0][0], 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float *row = x + m * N;
      float top = row[0];
      bool nan = false;
      for (int64_t j = 0; j < N; ++j) top = row[j] > top ? row[j] : top, nan |= row[j] != row[j];
      int64_t j = 0;
      while (nan ? row[j] == row[j] : row[j] != top) ++j;
      ids[m] = (int32_t)j;
    }
  });
  return kOk;
}
}  // namespace

extern "C" int QuantLinear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                           void *) {
  return plain_linear(nparam, params, ndims, shapes, dtypes);
}

// The same projection, returned from before its work is done (Pool::launch) inside a compiled
// step (QuantLinearAllowEarlyReturns): for the LM head, whose logits only ArgmaxRows and the
// step's outputs read; the engine waits (QuantLinearWait, or the next step's embedding) before
// it reads them. The task reads
// its own copy of x, whose memory MindSpore may give to a later op's output (an EAGLE-3
// concatenation) once this op has returned.
extern "C" int QuantLinearAsync(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                                void *) {
  if (!early_returns.load(std::memory_order_relaxed) || nparam != 5 || std::strcmp(dtypes[0], "float32") != 0)
    return plain_linear(nparam, params, ndims, shapes, dtypes);
  return launch_op(plain_linear, nparam, params, ndims, shapes, dtypes, true,
                   [](OpArgs &a) { a.own_input(0, numel(a.ndims[0], a.shapes[0]) * sizeof(float)); });
}

// ids [M] int32 (any shape of M elements: [M, 1] as a decode step's input_ids) = each row's
// arg-max of x [M, N] fp32 (argmax_rows). Behind a launched task (the LM head's) it is queued
// after it and returns at once.
extern "C" int ArgmaxRows(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                          void *) {
  if (early_returns.load(std::memory_order_relaxed) && Pool::get().task_pending())
    return launch_op(argmax_rows, nparam, params, ndims, shapes, dtypes, false);
  if (int err = Pool::get().sync()) return err;
  return argmax_rows(nparam, params, ndims, shapes, dtypes);
}

// Waits for the launched tasks; returns the first failure's error code since the last wait (0: none).
extern "C" int QuantLinearWait() { return Pool::get().sync(); }

extern "C" int QuantLinearSwiglu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *, void *) {
  if (nparam != 5) return kBadOther;
  return run_problem(params, ndims, shapes, dtypes, 1, false, 4, {Epilogue::kSwiglu, nullptr, 0, nullptr, 0.f});
}

extern "C" int QuantLinearResidual(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *, void *) {
  if (nparam != 7 || std::strcmp(dtypes[4], "float32") != 0 || std::strcmp(dtypes[5], "float32") != 0 ||
      numel(ndims[4], shapes[4]) != numel(ndims[6], shapes[6]))
    return kBadOther;
  return run_problem(params, ndims, shapes, dtypes, 1, false, 6,
                     {Epilogue::kResidual, nullptr, 0, static_cast<const float *>(params[4]),
                      *static_cast<const float *>(params[5])});
}

extern "C" int QuantRmsNormLinear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *, void *) {
  if (nparam != 7) return kBadOther;
  return run_problem(params, ndims, shapes, dtypes, 3, true, 6, {Epilogue::kPlain, nullptr, 0, nullptr, 0.f});
}

extern "C" int QuantRmsNormLinearSwiglu(int nparam, void **params, int *ndims, int64_t **shapes,
                                        const char **dtypes, void *, void *) {
  if (nparam != 7) return kBadOther;
  return run_problem(params, ndims, shapes, dtypes, 3, true, 6, {Epilogue::kSwiglu, nullptr, 0, nullptr, 0.f});
}

// A whole MLP block: y = r + scale[0] * swiglu(rmsnorm(x) Wgu^T) Wd^T, the two projections back to back.
//   QuantRmsNormSwigluMlp(x, g, eps, gu_packed, gu_scales, gu_offsets, d_packed, d_scales, d_offsets, r, scale, y)
extern "C" int QuantRmsNormSwigluMlp(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *, void *) {
  if (nparam != 12) return kBadOther;
  Problem p;
  if (int err = parse(params, ndims, shapes, dtypes, 3, &p)) return err;
  if (int err = normalise(params, ndims, shapes, dtypes, &p)) return err;
  const int64_t I = p.N / 2, K = p.w.K;
  QWeight down;
  int64_t n_down = 0;
  if (int err = parse_weight(params, ndims, shapes, dtypes, 6, I, &down, &n_down)) return err;
  if (n_down != K || p.N % 2 != 0 || std::strcmp(dtypes[9], "float32") != 0 ||
      std::strcmp(dtypes[10], "float32") != 0 || numel(ndims[9], shapes[9]) != p.M * K ||
      numel(ndims[11], shapes[11]) != p.M * K)
    return kBadOther;
  thread_local std::vector<float> hidden;  // the [M, I] SwiGLU activations, reused across calls
  hidden.resize(p.M * I);
  if (int err = execute(p.x, p.M, p.w, {Epilogue::kSwiglu, hidden.data(), I, nullptr, 0.f})) return err;
  return execute(hidden.data(), p.M, down,
                 {Epilogue::kResidual, static_cast<float *>(params[11]), K, static_cast<const float *>(params[9]),
                  *static_cast<const float *>(params[10])});
}

// A whole attention block: the q|k|v projection with its norm, RoPE + the cache write + paged
// attention, and o_proj with its residual, in one op (as the float layers' RmsNormAttentionBlock):
// each op a decode step launches costs MindSpore's runtime more host time than a small GEMV.
//   QuantRmsNormAttentionBlock(x, g, eps, qkv_packed, qkv_scales, qkv_offsets, cos, sin, positions,
//                              slot_mapping, block_tables, k_cache, v_cache, meta, o_packed, o_scales,
//                              o_offsets, r, scale, y)
extern "C" int QuantRmsNormAttentionBlock(int nparam, void **params, int *ndims, int64_t **shapes,
                                          const char **dtypes, void *, void *) {
  if (nparam != 20 || !paged::all_fp32(dtypes, {6, 7, 11, 12, 13, 17, 18})) return kBadOther;
  Problem p;
  if (int err = parse(params, ndims, shapes, dtypes, 3, &p)) return err;
  if (int err = normalise(params, ndims, shapes, dtypes, &p)) return err;
  const paged::CacheArgs cache(params, shapes, 6);
  const int64_t H = p.w.K, width = p.N, attended_width = width - 2 * cache.Hkv * cache.D;
  QWeight o;
  int64_t n_o = 0;
  if (attended_width <= 0) return kBadPacked;
  if (int err = parse_weight(params, ndims, shapes, dtypes, 14, attended_width, &o, &n_o)) return err;
  if (n_o != H || cache.B * cache.L != p.M || numel(ndims[17], shapes[17]) != p.M * H ||
      numel(ndims[19], shapes[19]) != p.M * H)
    return kBadOther;
  thread_local std::vector<float> qkv, attended;  // reused across calls
  qkv.resize(p.M * width), attended.resize(p.M * attended_width);
  if (int err = execute(p.x, p.M, p.w, {Epilogue::kPlain, qkv.data(), width, nullptr, 0.f})) return err;
  paged::rope_paged_attention(qkv.data(), width, cache, attended.data());
  return execute(attended.data(), p.M, o,
                 {Epilogue::kResidual, static_cast<float *>(params[19]), H, static_cast<const float *>(params[17]),
                  *static_cast<const float *>(params[18])});
}

// A whole pre-norm decoder layer: the attention block, then the MLP block on its output, in one
// op; each is as above, with the layer's input as the attention block's residual and the
// attention block's output as the MLP's input and residual. One op a layer instead of two: a
// decode step's ops each cost MindSpore's runtime host time (measured ~25 us an op here).
//   QuantRmsNormDecoderLayer(x, g1, eps1, qkv_packed, qkv_scales, qkv_offsets, cos, sin, positions,
//                            slot_mapping, block_tables, k_cache, v_cache, meta, o_packed, o_scales,
//                            o_offsets, scale, g2, eps2, gu_packed, gu_scales, gu_offsets,
//                            d_packed, d_scales, d_offsets, y)
namespace {
int decoder_layer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 27 || std::strcmp(dtypes[0], "float32") != 0 || numel(ndims[26], shapes[26]) != numel(ndims[0], shapes[0]))
    return kBadOther;
  thread_local std::vector<float> attended;  // the attention block's output: the MLP's x and residual
  attended.resize(numel(ndims[0], shapes[0]));
  constexpr int kAttended = -1;  // in the index lists below: the buffer above, shaped as x
  const auto call = [&](auto entry, std::initializer_list<int> from) {
    void *p[20];
    int nd[20];
    int64_t *sh[20];
    const char *dt[20];
    int i = 0;
    for (const int j : from) {
      const int src = j == kAttended ? 0 : j;
      p[i] = j == kAttended ? attended.data() : params[j];
      nd[i] = ndims[src], sh[i] = shapes[src], dt[i] = dtypes[src];
      ++i;
    }
    return entry(i, p, nd, sh, dt, nullptr, nullptr);
  };
  if (int err = call(QuantRmsNormAttentionBlock,
                     {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 0, 17, kAttended}))
    return err;
  return call(QuantRmsNormSwigluMlp, {kAttended, 18, 19, 20, 21, 22, 23, 24, 25, kAttended, 17, 26});
}
}  // namespace

extern "C" int QuantRmsNormDecoderLayer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                        void *, void *) {
  if (int err = Pool::get().sync()) return err;  // a launched layer's failure surfaces here
  return decoder_layer(nparam, params, ndims, shapes, dtypes);
}

// Whether QuantRmsNormDecoderLayerAsync may return before its work is done: only while a compiled
// graph runs (engine/runner.py), whose constants and intermediate buffers outlive the op's call
// until a later op of the graph. An op run on its own (PyNative) may see its inputs freed, and
// their memory handed to the next tensor, as soon as it returns.
extern "C" void QuantLinearAllowEarlyReturns(int on) { early_returns.store(on != 0); }

// The same layer, returned from before its work is done (Pool::launch) when allowed: for a layer
// whose output only the next layer's op reads, which waits for it. Its errors surface from the
// next op.
extern "C" int QuantRmsNormDecoderLayerAsync(int nparam, void **params, int *ndims, int64_t **shapes,
                                             const char **dtypes, void *, void *) {
  if (!early_returns.load(std::memory_order_relaxed))
    return QuantRmsNormDecoderLayer(nparam, params, ndims, shapes, dtypes, nullptr, nullptr);
  return launch_op(decoder_layer, nparam, params, ndims, shapes, dtypes);
}
