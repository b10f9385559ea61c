"""MiniMax's MoE block (docs/minimax.md#moe-routing, docs/minimax.md#shared-expert): an fp32 router over stacked SwiGLU experts, computed
by the device's MoE backend from ops/."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..ops.device import Device
from ..parallel import Shard, even_rows, tp_group
from .linear import Linear
from .params import zeros_parameter


class ExpertLinear(nn.Cell):
    """The same projection of the held experts, stacked: weight [experts held, sum(output_sizes),
    in_features]. The loader fills part (expert, i) from the checkpoint's own tensor of that
    expert. Tensor parallel within experts: "column" keeps this rank's rows of each part, "row"
    its columns; expert parallel: `held` is this rank's range of whole experts."""

    def __init__(self, num_experts: int, in_features: int, output_sizes: list[int], dtype=ms.float32,
                 held: slice | None = None, parallel: str | None = None):
        super().__init__()
        self.num_experts = num_experts
        self.held = held or slice(0, num_experts)
        self.full_shapes = [(n, in_features) for n in output_sizes]
        self.part_shards = [even_rows(n, "expert rows") if parallel == "column" else slice(0, n) for n in output_sizes]
        self.in_shard = even_rows(in_features, "expert columns") if parallel == "row" else slice(0, in_features)
        self.output_sizes = [s.stop - s.start for s in self.part_shards]
        shape = (self.held.stop - self.held.start, sum(self.output_sizes), self.in_shard.stop - self.in_shard.start)
        self.weight = zeros_parameter(shape, dtype, "weight")

    def part_rows(self, part: tuple[int, int]):
        expert, i = part
        start = sum(self.output_sizes[:i])
        return expert - self.held.start, slice(start, start + self.output_sizes[i])

    def loader_parts(self) -> set:
        return {(e, i) for e in range(self.num_experts) for i in range(len(self.output_sizes))}

    def checkpoint_shard(self, part: tuple[int, int]) -> Shard | None:
        """None for an expert another rank holds."""
        expert, i = part
        if not self.held.start <= expert < self.held.stop:
            return None
        return Shard(self.full_shapes[i], (self.part_shards[i], self.in_shard), self.part_rows(part))


class Experts(nn.Cell):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype=ms.float32,
                 held: slice | None = None, within: bool = False):
        super().__init__()
        self.w13 = ExpertLinear(num_experts, hidden_size, [intermediate_size, intermediate_size], dtype, held,
                                "column" if within else None)
        self.w2 = ExpertLinear(num_experts, intermediate_size, [hidden_size], dtype, held, "row" if within else None)


class MoE(nn.Cell):
    """backend: the device's MoE op (Device.moe). Tensor parallel: each rank computes its share
    of every token's output (its whole experts with expert parallelism, else its slice of every
    expert) and the shares are summed."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 backend: nn.Cell, dtype=ms.float32, device: Device | None = None):
        super().__init__()
        tp = tp_group()
        self.top_k = top_k
        # fp32 like the checkpoint
        self.gate = Linear(hidden_size, num_experts, ms.float32, exact_dtype=True, device=device)
        expert_parallel = tp.size > 1 and tp.expert_parallel
        held = even_rows(num_experts, "experts") if expert_parallel else slice(0, num_experts)
        self.first_expert = held.start
        self.experts = Experts(num_experts, hidden_size, intermediate_size, dtype, held,
                               within=tp.size > 1 and not expert_parallel)
        self.backend = backend
        self.all_reduce = ops.AllReduce() if tp.size > 1 else None

    def construct(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.gate(flat.astype(ms.float32))
        out = self.backend(flat, logits, self.experts.w13.weight, self.experts.w2.weight, self.top_k,
                           self.first_expert)
        if self.all_reduce is not None:
            out = self.all_reduce(out)
        return out.reshape(shape)
