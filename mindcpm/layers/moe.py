"""MiniMax's MoE block (minimax_m1 spec §4): an fp32 router over stacked SwiGLU experts, computed
by the device's MoE backend from ops/."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from .linear import Linear


class ExpertLinear(nn.Cell):
    """The same projection of every expert, stacked: weight [E, sum(output_sizes), in_features].
    The loader fills part (expert, i) from the checkpoint's own tensor of that expert."""

    def __init__(self, num_experts: int, in_features: int, output_sizes: list[int], dtype=ms.float32):
        super().__init__()
        self.num_experts = num_experts
        self.output_sizes = list(output_sizes)
        self.weight = Parameter(Tensor(np.zeros((num_experts, sum(output_sizes), in_features)), dtype),
                                name="weight", requires_grad=False)

    def part_rows(self, part: tuple[int, int]):
        expert, i = part
        start = sum(self.output_sizes[:i])
        return expert, slice(start, start + self.output_sizes[i])

    def loader_parts(self) -> set:
        return {(e, i) for e in range(self.num_experts) for i in range(len(self.output_sizes))}


class Experts(nn.Cell):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype=ms.float32):
        super().__init__()
        self.w13 = ExpertLinear(num_experts, hidden_size, [intermediate_size, intermediate_size], dtype)
        self.w2 = ExpertLinear(num_experts, intermediate_size, [hidden_size], dtype)


class MoE(nn.Cell):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 backend: nn.Cell, dtype=ms.float32):
        super().__init__()
        self.top_k = top_k
        self.gate = Linear(hidden_size, num_experts, ms.float32)  # the router, fp32 like the checkpoint
        self.experts = Experts(num_experts, hidden_size, intermediate_size, dtype)
        self.backend = backend

    def construct(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.gate(flat.astype(ms.float32))
        out = self.backend(flat, logits, self.experts.w13.weight, self.experts.w2.weight, self.top_k)
        return out.reshape(shape)
