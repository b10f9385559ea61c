"""CPU stand-ins for the Ascend MoE kernels MoeGatingTopKSoftmax, MoeInitRouting,
MoeComputeExpertTokens, GroupedMatmul, MoeFinalizeRouting, and for WeightQuantBatchMatmul.

In the manner of tests/ascend_standins.py: each is a composite nn.Cell with the op's
constructor and call signature that asserts the op's contract when traced and counts the call
in CALLS. What each computes follows the numpy goldens of MindSpore's own Ascend tests of the op
(written out, with the files named, in scripts/ascend_op_cases.py; tests/ops/test_ascend_standins.py
checks every stand-in against them and against the docstrings' worked examples):
- MoeGatingTopKSoftmax: softmax rounded to x's dtype, the k largest with ties to the lower
  expert, expert id E for `finished` rows, row_idx[i, j] = j*N + i;
- MoeInitRouting: assignments sorted by expert, stable in token-major order; expanded_row_idx
  maps a row_idx value to its sorted position; min(active_num, N)*k rows of expanded_x;
- MoeComputeExpertTokens: per expert the end of its rows (a cumulative count), (E,) entries;
- GroupedMatmul (split_item 3, group_type 0): rows of group e times weight[e], weight [E, K, N];
- MoeFinalizeRouting: x1 + x2 + sum_k scales * (expanded_x[expanded_row_idx[i + k*N]] + bias[e]);
- WeightQuantBatchMatmul: x @ ((weight + antiquant_offset) * antiquant_scale), int8 or int4
  (qint4x2) weights; also as the functional weight_quant_batch_matmul_standin.

Refused as the real ops refuse them (MindSpore 2.10's own inference rejects the first two):
GroupedMatmul with transpose_a/transpose_b (only a 310P with infer_boost may transpose; the 910B
takes weight [E, K, N]); MoeFinalizeRouting without its (E, H) bias; index inputs other than
int32 (group_list: int64, as the docstring and the 910B tests pass it).

Dtypes: MoeGatingTopKSoftmax takes fp16/bf16/fp32 (its docstring and test). GroupedMatmul's and
MoeFinalizeRouting's docstrings list fp16/fp32; their inference also accepts bf16, and CANN's op
documentation (ops-transformer gmm/grouped_matmul/README.md, moe/moe_finalize_routing/README.md)
lists bf16 for the Atlas A2 (910B), GroupedMatmul with an fp32 bias then, so the stand-ins take
bf16 that way (unverified on hardware; scripts/validate_ascend.py checks it on a device). Inputs
are widened to fp32 and the result is rounded to the input dtype once, as assumed of the device.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import constexpr

from tests.ascend_standins import CALLS, NAN, _require, verify

FLOATS = (ms.float16, ms.bfloat16, ms.float32)


def install_moe_standins(monkeypatch):
    """As install_standins, for the MoE kernels in mindcpm.ops.ascend_moe."""
    import mindcpm.ops.ascend_moe as ascend_moe
    verify(STANDINS)
    for name, standin in STANDINS.items():
        if hasattr(ascend_moe, name):
            monkeypatch.setattr(ascend_moe, name, standin)
    monkeypatch.setenv("MS_COMPILER_CACHE_ENABLE", "0")
    return CALLS


def _float_dtype(op, name, dtype):
    _require(dtype in FLOATS, op, f"{name} must be float16, bfloat16 or float32, got {dtype}")


# MoeGatingTopKSoftmax()(x, finished=None, k=1) -> (y, expert_idx, row_idx)
@constexpr
def _check_gating(x_shape, x_dtype, fin_shape, fin_dtype, k):
    op = "MoeGatingTopKSoftmax"
    CALLS[op] += 1
    _require(len(x_shape) == 2, op, f"the stand-in takes a 2D x (N, E), got {x_shape}")
    _float_dtype(op, "x", x_dtype)
    if fin_shape is not None:
        _require(fin_dtype == ms.bool_, op, f"finished must be bool, got {fin_dtype}")
        _require(tuple(fin_shape) == tuple(x_shape[:-1]), op, f"finished must be {x_shape[:-1]}, got {fin_shape}")
    _require(isinstance(k, int) and 0 < k <= x_shape[-1], op, f"k={k!r} must be in 1..{x_shape[-1]}")
    return True


class MoeGatingTopKSoftmaxStandIn(nn.Cell):
    def construct(self, x, finished=None, k=1):
        fin_shape, fin_dtype = (None, None) if finished is None else (finished.shape, finished.dtype)
        _check_gating(x.shape, x.dtype, fin_shape, fin_dtype, k)
        n, e = x.shape
        probs = ops.softmax(x.astype(ms.float32), -1).astype(x.dtype).astype(ms.float32)
        # Rank of expert j in its row: the experts above it, ties to the lower index (a stable
        # descending sort); then the expert at each of the first k ranks.
        a, b = probs.reshape(n, e, 1), probs.reshape(n, 1, e)
        lower = (ops.arange(e).reshape(1, e) < ops.arange(e).reshape(e, 1)).reshape(1, e, e)
        above = ops.logical_or(b > a, ops.logical_and(b == a, lower))
        rank = above.astype(ms.int32).sum(2)  # [N, E]
        at = (rank.reshape(n, e, 1) == ops.arange(k, dtype=ms.int32).reshape(1, 1, k)).astype(ms.float32)
        y = (probs.reshape(n, e, 1) * at).sum(1)
        expert_idx = (ops.arange(e, dtype=ms.float32).reshape(1, e, 1) * at).sum(1).astype(ms.int32)
        if finished is not None:
            expert_idx = ops.masked_fill(expert_idx, finished.reshape(n, 1), e)
        row_idx = ops.arange(n * k, dtype=ms.int32).reshape(k, n).transpose(1, 0)
        return y.astype(x.dtype), expert_idx, row_idx


# MoeInitRouting()(x, row_idx, expert_idx, active_num) -> (expanded_x, expanded_row_idx, expanded_expert_idx)
@constexpr
def _check_init_routing(x_shape, x_dtype, row_shape, row_dtype, exp_shape, exp_dtype, active_num):
    op = "MoeInitRouting"
    CALLS[op] += 1
    _require(len(x_shape) == 2, op, f"x must be 2D (NUM_ROWS, H), got {x_shape}")
    _float_dtype(op, "x", x_dtype)
    _require(len(exp_shape) == 2 and exp_shape[0] == x_shape[0], op,
             f"expert_idx must be (NUM_ROWS={x_shape[0]}, K), got {exp_shape}")
    _require(tuple(row_shape) == tuple(exp_shape), op, f"row_idx {row_shape} must have expert_idx's shape {exp_shape}")
    _require(row_dtype == ms.int32 and exp_dtype == ms.int32, op, f"row_idx/expert_idx must be int32, got {row_dtype}/{exp_dtype}")
    _require(isinstance(active_num, int) and active_num > 0, op, f"active_num must be a positive int, got {active_num!r}")
    return True


def _inverse_permutation(order):
    return ops.sort(order.astype(ms.float32))[1].astype(ms.int32)


class MoeInitRoutingStandIn(nn.Cell):
    def construct(self, x, row_idx, expert_idx, active_num):
        _check_init_routing(x.shape, x.dtype, row_idx.shape, row_idx.dtype, expert_idx.shape, expert_idx.dtype,
                            active_num)
        n, k = expert_idx.shape
        flat = ops.arange(n * k, dtype=ms.int32)
        # By expert, ties in token-major order. The CPU Sort is fp32: the key is exact while
        # num_experts * N * k < 2**24.
        key = expert_idx.reshape(-1) * (n * k) + flat
        order = ops.sort(key.astype(ms.float32))[1].astype(ms.int32)  # sorted position -> flat index
        sorted_source = ops.gather(row_idx.reshape(-1), order, 0)  # sorted position -> row_idx value
        rows = min(active_num, n) * k
        expanded_x = ops.gather(x.astype(ms.float32), sorted_source[:rows] % n, 0).astype(x.dtype)
        return expanded_x, _inverse_permutation(sorted_source), ops.gather(expert_idx.reshape(-1), order, 0)


# MoeComputeExpertTokens()(sorted_experts, num_expert) -> cumulative rows per expert, (num_expert,)
@constexpr
def _check_expert_tokens(shape, dtype, num_expert):
    op = "MoeComputeExpertTokens"
    CALLS[op] += 1
    _require(len(shape) == 1 and dtype == ms.int32, op, f"sorted_experts must be 1D int32, got {shape} {dtype}")
    _require(isinstance(num_expert, int) and num_expert > 0, op, f"num_expert {num_expert!r}")
    return True


class MoeComputeExpertTokensStandIn(nn.Cell):
    def construct(self, sorted_experts, num_expert):
        _check_expert_tokens(sorted_experts.shape, sorted_experts.dtype, num_expert)
        experts = ops.arange(num_expert, dtype=ms.int32).reshape(num_expert, 1)
        return (sorted_experts.reshape(1, -1) <= experts).astype(ms.int32).sum(1).astype(ms.int32)


# GroupedMatmul(split_item, group_type, transpose_a, transpose_b)(x, weight, bias, scale, offset,
#   antiquant_scale, antiquant_offset, group_list) -> (y,)
@constexpr
def _check_gmm(split_item, group_type, transpose_a, transpose_b, n_x, x_shape, x_dtype, n_w, w_shape, w_dtype,
               bias_shape, bias_dtype, quant_none, gl_shape, gl_dtype):
    op = "GroupedMatmul"
    CALLS[op] += 1
    _require(not (transpose_a or transpose_b), op,
             f"transpose_a and transpose_b must both be False on the 910B, got {transpose_a} and {transpose_b} "
             "(weight is [E, K, N])")
    _require(split_item == 3 and group_type == 0, op, "the stand-in implements split_item=3, group_type=0")
    _require(n_x == 1 and len(x_shape) == 2, op, f"x must be a list of one 2D tensor, got {n_x} of {x_shape}")
    _require(n_w == 1 and len(w_shape) == 3, op, f"weight must be a list of one 3D tensor, got {n_w} of {w_shape}")
    _float_dtype(op, "x", x_dtype)
    _require(w_dtype == x_dtype, op, f"x {x_dtype} and weight {w_dtype} differ")
    _require(x_shape[1] == w_shape[1], op, f"x {x_shape} does not multiply weight {w_shape} ([E, K, N])")
    if bias_shape is not None:
        want = ms.float32 if x_dtype == ms.bfloat16 else x_dtype  # CANN: no bf16 bias, fp32 with bf16 x
        _require(tuple(bias_shape) == (w_shape[0], w_shape[2]) and bias_dtype == want, op,
                 f"bias must be a list of one ({w_shape[0]}, {w_shape[2]}) {want} tensor, got {bias_shape} {bias_dtype}")
    _require(quant_none, op, "the stand-in implements no quantisation inputs")
    _require(gl_shape is not None and len(gl_shape) == 1 and gl_shape[0] == w_shape[0], op,
             f"group_list must be 1D with weight.shape[0]={w_shape[0]} entries, got {gl_shape}")
    _require(gl_dtype == ms.int64, op, f"group_list must be int64, got {gl_dtype}")
    return True


class GroupedMatmulStandIn(nn.Cell):
    def __init__(self, split_item=0, group_type=-1, transpose_a=False, transpose_b=False):
        super().__init__()
        self.split_item, self.group_type = split_item, group_type
        self.transpose_a, self.transpose_b = transpose_a, transpose_b
        self.bmm = ops.BatchMatMul()

    def construct(self, x, weight, bias=None, scale=None, offset=None, antiquant_scale=None,
                  antiquant_offset=None, group_list=None):
        quant_none = scale is None and offset is None and antiquant_scale is None and antiquant_offset is None
        bias_shape, bias_dtype = (None, None) if bias is None else (bias[0].shape, bias[0].dtype)
        _check_gmm(self.split_item, self.group_type, self.transpose_a, self.transpose_b, len(x), x[0].shape,
                   x[0].dtype, len(weight), weight[0].shape, weight[0].dtype, bias_shape, bias_dtype, quant_none,
                   None if group_list is None else group_list.shape,
                   None if group_list is None else group_list.dtype)
        rows, w = x[0].astype(ms.float32), weight[0].astype(ms.float32)
        m = rows.shape[0]
        # Row r belongs to the first group whose cumulative end exceeds r; rows past the last
        # end are undefined (NaN).
        group = (ops.arange(m, dtype=ms.int64).reshape(m, 1) >= group_list.reshape(1, -1)).astype(ms.int32).sum(1)
        outside = group >= w.shape[0]
        group = ops.minimum(group, w.shape[0] - 1)
        y = self.bmm(rows.reshape(m, 1, -1), ops.gather(w, group, 0)).reshape(m, -1)
        if bias is not None:
            y = y + ops.gather(bias[0].astype(ms.float32), group, 0)
        y = ops.masked_fill(y, outside.reshape(m, 1), NAN)
        return (y.astype(x[0].dtype),)


# MoeFinalizeRouting()(expanded_x, x1, x2, bias, scales, expanded_row_idx, expanded_expert_idx)
@constexpr
def _check_finalize(ex_shape, ex_dtype, x1_shape, x1_dtype, x2_shape, x2_dtype, bias_shape, bias_dtype, sc_shape,
                    sc_dtype, ri_shape, ri_dtype, ei_shape, ei_dtype):
    op = "MoeFinalizeRouting"
    CALLS[op] += 1
    _require(bias_shape is not None, op, "bias is a required (E, H) tensor (zeros when the experts have none)")
    _require(len(x1_shape) == 2, op, f"x1 must be (N, H), got {x1_shape}")
    n, h = x1_shape
    _require(len(sc_shape) == 2 and sc_shape[0] == n, op, f"scales must be (N={n}, K), got {sc_shape}")
    k = sc_shape[1]
    _require(tuple(ex_shape) == (k * n, h), op, f"expanded_x must be (K*N, H) = {(k * n, h)}, got {ex_shape}")
    _float_dtype(op, "expanded_x", ex_dtype)
    same = x1_dtype == ex_dtype and sc_dtype == ex_dtype and bias_dtype == ex_dtype
    _require(same and (x2_dtype is None or x2_dtype == ex_dtype), op,
             f"expanded_x {ex_dtype}, x1 {x1_dtype}, x2 {x2_dtype}, bias {bias_dtype} and scales {sc_dtype} "
             "must share one float dtype")
    _require(x2_shape is None or tuple(x2_shape) == (n, h), op, f"x2 must be (N, H) = {(n, h)}, got {x2_shape}")
    _require(len(bias_shape) == 2 and bias_shape[1] == h, op, f"bias must be (E, H={h}), got {bias_shape}")
    _require(tuple(ri_shape) == (k * n,) and ri_dtype == ms.int32, op,
             f"expanded_row_idx must be int32 (K*N,), got {ri_shape} {ri_dtype}")
    _require(tuple(ei_shape) == (n, k) and ei_dtype == ms.int32, op,
             f"expanded_expert_idx must be int32 (N, K), got {ei_shape} {ei_dtype}")
    return True


def _shape_dtype(t):
    return (None, None) if t is None else (t.shape, t.dtype)


class MoeFinalizeRoutingStandIn(nn.Cell):
    def construct(self, expanded_x, x1, x2=None, bias=None, scales=None, expanded_row_idx=None,
                  expanded_expert_idx=None):
        _check_finalize(expanded_x.shape, expanded_x.dtype, x1.shape, x1.dtype, *_shape_dtype(x2),
                        *_shape_dtype(bias), scales.shape, scales.dtype, expanded_row_idx.shape,
                        expanded_row_idx.dtype, expanded_expert_idx.shape, expanded_expert_idx.dtype)
        n, k = scales.shape
        # [k, N, H]: choice j of token i is row expanded_row_idx[i + j*N] of expanded_x.
        picked = ops.gather(expanded_x.astype(ms.float32), expanded_row_idx, 0).reshape(k, n, -1)
        picked = picked + ops.gather(bias.astype(ms.float32), expanded_expert_idx.transpose(1, 0), 0)
        out = x1.astype(ms.float32) + (picked * scales.astype(ms.float32).transpose(1, 0).reshape(k, n, 1)).sum(0)
        if x2 is not None:
            out = out + x2.astype(ms.float32)
        return out.astype(x1.dtype)


# WeightQuantBatchMatmul(transpose_x, transpose_weight, antiquant_group_size)(x, weight,
#   antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias) -> y, and its functional
#   form weight_quant_batch_matmul(x, ..., bias, transpose_x, transpose_weight, antiquant_group_size).
# Limits from CANN's aclnnWeightQuantBatchMatmulV2 documentation (A2/A3); weight int8 [K, N] or
# qint4x2 [K, N/2] (column 2j in the low nibble, as MindSpore's test_weight_quant_int4.py packs it).
@constexpr
def _check_wqbm(transpose_x, transpose_weight, group_size, x_shape, x_dtype, w_shape, w_dtype, s_shape, s_dtype,
                o_shape, o_dtype, extras_none):
    op = "WeightQuantBatchMatmul"
    CALLS[op] += 1
    _require(not (transpose_x or transpose_weight), op, "the stand-in implements transpose_x = transpose_weight = False")
    _require(extras_none, op, "the stand-in implements no quant_scale / quant_offset / bias")
    _require(x_dtype in (ms.float16, ms.bfloat16), op, f"x must be float16 or bfloat16, got {x_dtype}")
    _require(w_dtype in (ms.int8, ms.qint4x2), op, f"the stand-in implements int8 and qint4x2 weights, got {w_dtype}")
    k, n = w_shape[0], w_shape[1] * (2 if w_dtype == ms.qint4x2 else 1)
    _require(len(x_shape) == 2 and len(w_shape) == 2 and x_shape[1] == k, op,
             f"x {x_shape} does not multiply weight {w_shape} ([K, N], or [K, N/2] for qint4x2)")
    _require(max(k, n) <= 65535, op, f"K={k} and N={n} must be at most 65535")
    _require(not group_size or (group_size % 32 == 0 and 32 <= group_size < k and k % group_size == 0), op,
             f"antiquant_group_size {group_size} must be 0 or a multiple of 32 below and dividing K={k}")
    want = (n,) if not group_size else (k // group_size, n)
    _require(tuple(s_shape) == want and s_dtype == x_dtype, op, f"antiquant_scale must be {want} {x_dtype}, got {s_shape} {s_dtype}")
    _require(o_shape is None or (tuple(o_shape) == want and o_dtype == x_dtype), op,
             f"antiquant_offset must be {want} {x_dtype}, got {o_shape} {o_dtype}")
    return True


def _weight_values(weight):
    """The weight's signed values as fp32 [K, N]. A qint4x2 weight is read as its bytes, which
    MindSpore 2.10 does op by op only (in a graph, ViewDtype's inference is "not impl")."""
    if weight.dtype != ms.qint4x2:
        return weight.astype(ms.float32)
    byte = ops.bitwise_and(weight.view(ms.int8).astype(ms.int32), 255)
    nibbles = ops.stack((byte % 16, byte // 16), -1)
    nibbles = nibbles - 16 * (nibbles >= 8).astype(ms.int32)  # two's complement of 4 bits
    return nibbles.reshape(weight.shape[0], -1).astype(ms.float32)


def weight_quant_batch_matmul_standin(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                      quant_offset=None, bias=None, transpose_x=False, transpose_weight=False,
                                      antiquant_group_size=0):
    """x @ ((weight + antiquant_offset) * antiquant_scale): the sum and the product each rounded to
    x's dtype, as MindSpore's per-channel int4 golden computes the dequantized weight (in fp16 numpy
    arithmetic; within its 1e-3 the weight cannot be dequantized in fp32 instead), the matrix
    product accumulated in fp32 and rounded to x's dtype once."""
    _check_wqbm(transpose_x, transpose_weight, antiquant_group_size, x.shape, x.dtype, weight.shape,
                weight.dtype, antiquant_scale.shape, antiquant_scale.dtype, *_shape_dtype(antiquant_offset),
                quant_scale is None and quant_offset is None and bias is None)
    w = _weight_values(weight)
    if antiquant_offset is not None:
        w = _rounded(w + _per_row(antiquant_offset, antiquant_group_size), x.dtype)
    w = _rounded(w * _per_row(antiquant_scale, antiquant_group_size), x.dtype)
    return ops.matmul(x.astype(ms.float32), w).astype(x.dtype)


def _rounded(a, dtype):
    return a.astype(dtype).astype(ms.float32)


def _per_row(a, group_size):
    """A per-channel (N,) or per-group (K/g, N) antiquant tensor spread over the K rows."""
    a = a.astype(ms.float32)
    if not group_size:
        return a.reshape(1, -1)
    return ops.repeat_interleave(a, group_size, 0)


class WeightQuantBatchMatmulStandIn(nn.Cell):
    def __init__(self, transpose_x=False, transpose_weight=False, antiquant_group_size=0):
        super().__init__()
        self.transpose_x, self.transpose_weight, self.group_size = transpose_x, transpose_weight, antiquant_group_size

    def construct(self, x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None, quant_offset=None,
                  bias=None):
        return weight_quant_batch_matmul_standin(x, weight, antiquant_scale, antiquant_offset, quant_scale,
                                                 quant_offset, bias, self.transpose_x, self.transpose_weight,
                                                 self.group_size)


STANDINS = {"MoeGatingTopKSoftmax": MoeGatingTopKSoftmaxStandIn, "MoeInitRouting": MoeInitRoutingStandIn,
            "MoeComputeExpertTokens": MoeComputeExpertTokensStandIn, "GroupedMatmul": GroupedMatmulStandIn,
            "MoeFinalizeRouting": MoeFinalizeRoutingStandIn, "WeightQuantBatchMatmul": WeightQuantBatchMatmulStandIn}
