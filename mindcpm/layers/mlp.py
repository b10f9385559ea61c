from __future__ import annotations

import mindspore as ms
from mindspore import nn

from ..ops.device import Device
from .linear import Linear


class SwiGLU(nn.Cell):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype=ms.float32, device: Device | None = None):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, [intermediate_size, intermediate_size], dtype, "swiglu",
                                   parallel="column", device=device)
        self.down_proj = Linear(intermediate_size, hidden_size, dtype, parallel="row", device=device)
        self.intermediate_size = intermediate_size

    def construct(self, x):
        return self.down_proj(self.gate_up_proj(x))
