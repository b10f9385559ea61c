from __future__ import annotations

import mindspore as ms
from mindspore import nn

from ..ops import swiglu_mlp
from .linear import Linear


class SwiGLU(nn.Cell):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one projection. With a
    residual_scale, construct(x, r) returns r + residual_scale * down(...). With an input_norm,
    x is the un-normalised input and gate|up applies the norm (see Linear); with both, the
    device may run the whole block as one op (ops.swiglu_mlp)."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype=ms.float32,
                 residual_scale: float | None = None, input_norm=None):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, [intermediate_size, intermediate_size], dtype, "swiglu",
                                   parallel="column", input_norm=input_norm)
        self.down_proj = Linear(intermediate_size, hidden_size, dtype,
                                "plain" if residual_scale is None else "residual", residual_scale or 1.0,
                                parallel="row")
        self.intermediate_size = intermediate_size
        self.fused = swiglu_mlp(self.gate_up_proj.matmul, self.down_proj.matmul)

    def construct(self, x, residual=None):
        if self.fused is not None:
            return self.fused(x, self.gate_up_proj.input_norm.weight, self.gate_up_proj.weight,
                              self.down_proj.weight, residual)
        return self.down_proj(self.gate_up_proj(x), residual)
