from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from .linear import Linear


class SwiGLU(nn.Cell):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype=ms.float32):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, [intermediate_size, intermediate_size], dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, dtype)
        self.intermediate_size = intermediate_size

    def construct(self, x):
        gate_up = self.gate_up_proj(x)
        gate, up = gate_up[..., : self.intermediate_size], gate_up[..., self.intermediate_size:]
        return self.down_proj(ops.silu(gate) * up)
