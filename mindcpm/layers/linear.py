"""The one linear layer every projection goes through, so a new weight format is one class."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from ..ops import matmul, weight_dtype


class Linear(nn.Cell):
    """y = epilogue(x W^T) with W stored (out_features, in_features), no bias.

    `output_sizes` names the parts of a fused projection (q|k|v, gate|up); the loader fills
    each part from its own checkpoint tensor. The epilogue is "plain", "swiglu" (the output is
    silu(gate) * up of a gate|up projection) or "residual" (construct(x, r) = r + scale x W^T),
    so the device's op can fuse it.
    """

    def __init__(self, in_features: int, output_sizes: list[int] | int, dtype=ms.float32,
                 epilogue: str = "plain", scale: float = 1.0):
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.in_features = in_features
        out_features = sum(self.output_sizes)
        self.weight = Parameter(Tensor(np.zeros((out_features, in_features)), weight_dtype(dtype)), name="weight",
                                requires_grad=False)
        self.matmul = matmul(epilogue, scale)

    def construct(self, x, residual=None):
        return self.matmul(x, self.weight, residual)

    def part_rows(self, part: int) -> slice:
        start = sum(self.output_sizes[:part])
        return slice(start, start + self.output_sizes[part])
