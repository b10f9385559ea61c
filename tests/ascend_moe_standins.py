"""CPU stand-ins for the Ascend MoE kernels MoeGatingTopKSoftmax, MoeInitRouting,
MoeComputeExpertTokens, GroupedMatmul and MoeFinalizeRouting.

Written from the ops' documented semantics (mindspore 2.10.0 docstrings, collected in
/work/shared/spec/ascend_ops_reference.md), not from our backend, in the manner of
tests/ascend_standins.py: each is a composite nn.Cell with the op's constructor and call
signature that asserts the documented contract on shapes, dtypes and attributes when traced,
and counts the call in CALLS.

Assumptions where the docstrings are thin (each is what the aclnn documentation of the same
kernel describes, and what MindSpore's MoE users pass):
- MoeGatingTopKSoftmax's row_idx[i, j] = j*N + i (token i's j-th choice in k-major order);
- MoeInitRouting sorts the N*k assignments by expert, ties in k-major source order; its
  expanded_row_idx maps a k-major source position to its sorted position (this is the index
  MoeFinalizeRouting's formula reads as expanded_row_idx[i + k*N]);
- MoeComputeExpertTokens returns, per expert, the end of its rows in the sorted order
  (cumulative counts), which is GroupedMatmul's group_list form.
Only the forms the backend uses are implemented (no `finished`, no active-num truncation,
no bias/quantisation); anything else fails the contract.

Deviation on purpose: the kernels' documented dtypes are fp16 (GroupedMatmul/MoeFinalizeRouting
also fp32); the stand-ins also accept bf16 (unverified on hardware) and fp32 everywhere, so the
fp32 CPU model can run through them.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import constexpr

from tests.ascend_standins import CALLS, _require

FLOATS = (ms.float16, ms.bfloat16, ms.float32)


def install_moe_standins(monkeypatch):
    import mindcpm.ops.ascend_moe as ascend_moe
    for name, standin in (("MoeGatingTopKSoftmax", MoeGatingTopKSoftmaxStandIn),
                          ("MoeInitRouting", MoeInitRoutingStandIn),
                          ("MoeComputeExpertTokens", MoeComputeExpertTokensStandIn),
                          ("GroupedMatmul", GroupedMatmulStandIn),
                          ("MoeFinalizeRouting", MoeFinalizeRoutingStandIn)):
        monkeypatch.setattr(ascend_moe, name, standin)
    monkeypatch.setenv("MS_COMPILER_CACHE_ENABLE", "0")
    return CALLS


# MoeGatingTopKSoftmax()(x, finished=None, k=1) -> (y, expert_idx, row_idx)
@constexpr
def _check_gating(x_shape, x_dtype, finished_none, k):
    op = "MoeGatingTopKSoftmax"
    CALLS[op] += 1
    _require(len(x_shape) == 2, op, f"the stand-in takes a 2D x (N, E), got {x_shape}")
    _require(x_dtype in FLOATS, op, f"x dtype {x_dtype}")
    _require(finished_none, op, "the stand-in implements no `finished`")
    _require(isinstance(k, int) and 0 < k <= x_shape[-1], op, f"k={k!r} must be in 1..{x_shape[-1]}")
    return True


class MoeGatingTopKSoftmaxStandIn(nn.Cell):
    def construct(self, x, finished=None, k=1):
        _check_gating(x.shape, x.dtype, finished is None, k)
        n = x.shape[0]
        y, expert_idx = ops.topk(ops.softmax(x.astype(ms.float32), -1), k)
        row_idx = ops.arange(n * k, dtype=ms.int32).reshape(k, n).transpose(1, 0)
        return y.astype(x.dtype), expert_idx.astype(ms.int32), row_idx


# MoeInitRouting()(x, row_idx, expert_idx, active_num) -> (expanded_x, expanded_row_idx, expanded_expert_idx)
@constexpr
def _check_init_routing(x_shape, x_dtype, row_shape, row_dtype, exp_shape, exp_dtype, active_num):
    op = "MoeInitRouting"
    CALLS[op] += 1
    _require(len(x_shape) == 2, op, f"x must be 2D (NUM_ROWS, H), got {x_shape}")
    _require(x_dtype in FLOATS, op, f"x dtype {x_dtype}")
    _require(len(exp_shape) == 2 and exp_shape[0] == x_shape[0], op,
             f"expert_idx must be (NUM_ROWS={x_shape[0]}, K), got {exp_shape}")
    _require(tuple(row_shape) == tuple(exp_shape), op, f"row_idx {row_shape} must have expert_idx's shape {exp_shape}")
    _require(row_dtype == ms.int32 and exp_dtype == ms.int32, op, f"row_idx/expert_idx must be int32, got {row_dtype}/{exp_dtype}")
    _require(isinstance(active_num, int) and active_num >= x_shape[0], op,
             f"the stand-in implements active_num >= NUM_ROWS only, got {active_num!r}")
    return True


def _inverse_permutation(order):
    return ops.sort(order.astype(ms.float32))[1].astype(ms.int32)


class MoeInitRoutingStandIn(nn.Cell):
    def construct(self, x, row_idx, expert_idx, active_num):
        _check_init_routing(x.shape, x.dtype, row_idx.shape, row_idx.dtype, expert_idx.shape, expert_idx.dtype,
                            active_num)
        n, k = expert_idx.shape
        # Source position s = row_idx[i, j] holds token i's j-th expert.
        source = row_idx.reshape(-1)
        expert_of_source = ops.zeros((n * k,), ms.int32)
        expert_of_source = ops.tensor_scatter_elements(expert_of_source, source, expert_idx.reshape(-1), 0)
        token_of_source = ops.zeros((n * k,), ms.int32)
        tokens = ops.tile(ops.arange(n, dtype=ms.int32).reshape(n, 1), (1, k)).reshape(-1)
        token_of_source = ops.tensor_scatter_elements(token_of_source, source, tokens, 0)
        key = expert_of_source * (n * k) + ops.arange(n * k, dtype=ms.int32)  # by expert, then source
        order = ops.sort(key.astype(ms.float32))[1].astype(ms.int32)  # sorted position -> source
        expanded_x = ops.gather(x, ops.gather(token_of_source, order, 0), 0)
        return expanded_x, _inverse_permutation(order), ops.gather(expert_of_source, order, 0)


# MoeComputeExpertTokens()(sorted_experts, num_expert) -> cumulative rows per expert
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
def _check_gmm(split_item, group_type, transpose_a, n_x, x_shape, x_dtype, n_w, w_shape, w_dtype,
               extras_none, gl_shape, gl_dtype, transpose_b):
    op = "GroupedMatmul"
    CALLS[op] += 1
    _require(split_item == 3 and group_type == 0, op, "the stand-in implements split_item=3, group_type=0")
    _require(not transpose_a, op, "transpose_a is not implemented")
    _require(n_x == 1 and len(x_shape) == 2, op, f"x must be a list of one 2D tensor, got {n_x} of {x_shape}")
    _require(n_w == 1 and len(w_shape) == 3, op, f"weight must be a list of one 3D tensor, got {n_w} of {w_shape}")
    _require(x_dtype in FLOATS and w_dtype == x_dtype, op, f"x {x_dtype} and weight {w_dtype}")
    _require(extras_none, op, "bias / quantisation inputs are not implemented")
    _require(gl_shape is not None and len(gl_shape) == 1 and gl_shape[0] == w_shape[0], op,
             f"group_list must be 1D with weight.shape[0]={w_shape[0]} entries, got {gl_shape}")
    _require(gl_dtype == ms.int64, op, f"group_list must be int64, got {gl_dtype}")
    inner = w_shape[2] if transpose_b else w_shape[1]
    _require(x_shape[1] == inner, op, f"x {x_shape} does not multiply weight {w_shape} (transpose_b={transpose_b})")
    return True


class GroupedMatmulStandIn(nn.Cell):
    def __init__(self, split_item=0, group_type=-1, transpose_a=False, transpose_b=False):
        super().__init__()
        self.split_item, self.group_type = split_item, group_type
        self.transpose_a, self.transpose_b = transpose_a, transpose_b
        self.bmm = ops.BatchMatMul(transpose_b=transpose_b)

    def construct(self, x, weight, bias=None, scale=None, offset=None, antiquant_scale=None,
                  antiquant_offset=None, group_list=None):
        extras = bias is None and scale is None and offset is None and antiquant_scale is None \
            and antiquant_offset is None
        _check_gmm(self.split_item, self.group_type, self.transpose_a, len(x), x[0].shape, x[0].dtype,
                   len(weight), weight[0].shape, weight[0].dtype, extras,
                   None if group_list is None else group_list.shape,
                   None if group_list is None else group_list.dtype, self.transpose_b)
        rows, w = x[0], weight[0]
        m = rows.shape[0]
        # Row r belongs to the first group whose cumulative end exceeds r.
        group = (ops.arange(m, dtype=ms.int64).reshape(m, 1) >= group_list.reshape(1, -1)).astype(ms.int32).sum(1)
        group = ops.minimum(group, w.shape[0] - 1)
        y = self.bmm(rows.reshape(m, 1, -1), ops.gather(w, group, 0)).reshape(m, -1)
        return (y,)


# MoeFinalizeRouting()(expanded_x, x1, x2, bias, scales, expanded_row_idx, expanded_expert_idx)
#   out[i] = x1[i] + x2[i] + sum_k scales[i, k] * (expanded_x[expanded_row_idx[i + k*N]] + bias[expert])
@constexpr
def _check_finalize(ex_shape, ex_dtype, x1_shape, x1_dtype, x2_none, bias_none, sc_shape, sc_dtype,
                    ri_shape, ri_dtype, ei_shape, ei_dtype):
    op = "MoeFinalizeRouting"
    CALLS[op] += 1
    _require(len(x1_shape) == 2, op, f"x1 must be (N, H), got {x1_shape}")
    n, h = x1_shape
    _require(len(sc_shape) == 2 and sc_shape[0] == n, op, f"scales must be (N={n}, K), got {sc_shape}")
    k = sc_shape[1]
    _require(tuple(ex_shape) == (k * n, h), op, f"expanded_x must be (K*N, H) = {(k * n, h)}, got {ex_shape}")
    _require(ex_dtype in FLOATS and x1_dtype == ex_dtype and sc_dtype == ex_dtype, op,
             f"expanded_x {ex_dtype}, x1 {x1_dtype} and scales {sc_dtype} must share one float dtype")
    _require(x2_none and bias_none, op, "the stand-in implements no x2 / bias")
    _require(tuple(ri_shape) == (k * n,) and ri_dtype == ms.int32, op, f"expanded_row_idx must be int32 (K*N,), got {ri_shape} {ri_dtype}")
    _require(tuple(ei_shape) == (n, k) and ei_dtype == ms.int32, op, f"expanded_expert_idx must be int32 (N, K), got {ei_shape} {ei_dtype}")
    return True


class MoeFinalizeRoutingStandIn(nn.Cell):
    def construct(self, expanded_x, x1, x2=None, bias=None, scales=None, expanded_row_idx=None,
                  expanded_expert_idx=None):
        _check_finalize(expanded_x.shape, expanded_x.dtype, x1.shape, x1.dtype, x2 is None, bias is None,
                        scales.shape, scales.dtype, expanded_row_idx.shape, expanded_row_idx.dtype,
                        expanded_expert_idx.shape, expanded_expert_idx.dtype)
        n, k = scales.shape
        picked = ops.gather(expanded_x, expanded_row_idx, 0).reshape(k, n, -1)  # [k, N, H]: source i + k*N
        return x1 + (picked * scales.transpose(1, 0).reshape(k, n, 1)).sum(0)
