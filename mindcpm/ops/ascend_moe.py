"""MoE with MindSpore's Ascend MoE kernels (docs/minimax.md#moe-routing):

  route     MoeGatingTopKSoftmax   softmax over the fp32 router logits and top-k: weights [N, k],
                                   expert ids [N, k] and row_idx [N, k] (row_idx[i, j] = j*N + i,
                                   the k-major position of token i's j-th choice); the weights are
                                   then renormalised to sum to 1 (MiniMax renormalises, docs/minimax.md#moe-routing).
  permute   MoeInitRouting         token copies sorted by expert: expanded_x [N*k, H],
                                   expanded_row_idx [N*k] (k-major source -> sorted position) and
                                   the sorted expert ids [N*k].
  counts    MoeComputeExpertTokens cumulative rows per expert [E] -> GroupedMatmul's group_list.
  experts   GroupedMatmul x2       split_item=3, group_type=0: one x [N*k, in], one stacked weight
                                   [E, in, out], SwiGLU between the two. Not transposed: MindSpore's
                                   inference refuses transpose_b on the 910B (grouped_matmul.cc); the
                                   loader fills [E, out, in] and Device.after_load transposes it
                                   once, as vllm-mindspore's fused MoE keeps [E, in, out].
  combine   MoeFinalizeRouting     out[i] = x1[i] + sum_k scales[i, k] * (expanded[expanded_row_idx[i + k*N]]
                                   + bias[expert]), with x1 and bias zeros: bias is a required (E, H)
                                   tensor in the activation dtype (its inference refuses None, and
                                   so does aclnnMoeFinalizeRouting).

Unverified on hardware (no NPU was available): the 2.10 docstrings list fp16 (and fp32 for the
grouped form) for GroupedMatmul and MoeFinalizeRouting, not bf16, though their inference accepts
bf16 (tests/ops/test_ascend_vendor_checks.py compiles both dtypes through it). The CPU contract test
(tests/ops/test_ascend_moe.py) runs these exact calls through stand-ins written from
the documentation (tests/ascend_moe_standins.py).

The kernels are module-level names so that tests can replace them.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops.auto_generate import (GroupedMatmul, MoeComputeExpertTokens, MoeFinalizeRouting,
                                         MoeGatingTopKSoftmax, MoeInitRouting)


class AscendMoE(nn.Cell):
    def __init__(self):
        super().__init__()
        self.gating = MoeGatingTopKSoftmax()
        self.init_routing = MoeInitRouting()
        self.expert_tokens = MoeComputeExpertTokens()
        self.gmm = GroupedMatmul(split_item=3, group_type=0, transpose_a=False, transpose_b=False)
        self.finalize = MoeFinalizeRouting()

    def construct(self, x, router_logits, w13, w2, top_k, first_expert=0):
        """x [N, hidden]; router_logits [N, E] fp32; w13 [E, hidden, 2I]; w2 [E, I, hidden]
        (first_expert: expert parallelism, which the Device refuses for this op)."""
        n, hidden = x.shape
        num_experts, inter = w13.shape[0], w13.shape[2] // 2
        weights, experts, row_idx = self.gating(router_logits.astype(ms.float32), None, top_k)
        weights = weights / weights.sum(-1, keepdims=True)
        expanded_x, expanded_row_idx, sorted_experts = self.init_routing(x, row_idx, experts, n)
        group_list = self.expert_tokens(sorted_experts, num_experts).astype(ms.int64)
        gate_up = self.gmm([expanded_x], [w13], None, None, None, None, None, group_list)[0]
        act = ops.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        down = self.gmm([act], [w2], None, None, None, None, None, group_list)[0]  # [N*k, hidden]
        bias = ops.zeros((num_experts, hidden), down.dtype)
        return self.finalize(down, ops.zeros((n, hidden), down.dtype), None, bias,
                             weights.astype(down.dtype), expanded_row_idx, experts)
