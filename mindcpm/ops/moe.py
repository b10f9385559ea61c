"""Routed-expert MoE with ops that run on every device (docs/minimax.md#moe-routing):
softmax over the router logits in fp32 -> top-k -> renormalise -> SwiGLU experts.

Two static forms, chosen by shape at compile time, neither with a loop over tokens:
- few assignments (decode: tokens * top_k <= experts): gather each token's k experts' weights
  and run them as one batched matmul, reading only the weights that are used;
- otherwise (prefill): every expert over all tokens, weighted by a [tokens, experts] combine
  matrix that is zero outside each token's top-k. Dense, so E/k times the routed FLOPs: a
  grouped-matmul kernel (the Ascend backend) removes that.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops


def route(router_logits, top_k: int):
    """(weights [N, k] fp32 summing to 1, expert ids [N, k] int32) from fp32 router logits."""
    probs = ops.softmax(router_logits.astype(ms.float32), -1)
    weights, experts = ops.topk(probs, top_k)
    return weights / weights.sum(-1, keepdims=True), experts.astype(ms.int32)


class NativeMoE(nn.Cell):
    def __init__(self):
        super().__init__()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.matmul_t = ops.MatMul(transpose_b=True)

    def construct(self, x, router_logits, w13, w2, top_k, first_expert=0):
        """x [N, hidden]; router_logits [N, E] fp32; w13 [E', 2I, hidden] (gate rows, then up rows);
        w2 [E', hidden, I], the E' experts held from first_expert on (expert parallel: the other
        experts' shares are another rank's). Returns [N, hidden] in x's dtype."""
        n, hidden = x.shape
        num_experts, inter = w13.shape[0], w13.shape[1] // 2
        weights, experts = route(router_logits, top_k)
        if num_experts < router_logits.shape[-1]:
            experts = experts - first_expert
            held = ops.logical_and(experts >= 0, experts < num_experts)
            weights = ops.where(held, weights, 0.0)
            experts = ops.where(held, experts, 0)
        weights = weights.astype(x.dtype)
        if n * top_k <= num_experts:
            ids = experts.reshape(-1)
            xs = ops.tile(x.reshape(n, 1, 1, hidden), (1, top_k, 1, 1)).reshape(n * top_k, 1, hidden)
            gate_up = self.bmm_t(xs, ops.gather(w13, ids, 0))  # [N*k, 1, 2I]
            act = ops.silu(gate_up[..., :inter]) * gate_up[..., inter:]
            y = self.bmm_t(act, ops.gather(w2, ids, 0)).reshape(n, top_k, hidden)
            return (y * weights.reshape(n, top_k, 1)).sum(1)
        combine = (ops.one_hot(experts, num_experts, ops.ones((), x.dtype), ops.zeros((), x.dtype))
                   * weights.reshape(n, top_k, 1)).sum(1)  # [N, E]
        out = ops.zeros((n, hidden), x.dtype)
        for e in range(num_experts):
            gate_up = self.matmul_t(x, w13[e])
            act = ops.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            out = out + combine[:, e:e + 1] * self.matmul_t(act, w2[e])
        return out
