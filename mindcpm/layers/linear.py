"""The one linear layer every projection goes through, so a new weight format is one class."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops


class Linear(nn.Cell):
    """y = x W^T with W stored (out_features, in_features), no bias.

    `output_sizes` names the parts of a fused projection (q|k|v, gate|up); the loader fills
    each part from its own checkpoint tensor.
    """

    def __init__(self, in_features: int, output_sizes: list[int] | int, dtype=ms.float32):
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.in_features = in_features
        out_features = sum(self.output_sizes)
        self.weight = Parameter(Tensor(np.zeros((out_features, in_features)), dtype), name="weight",
                                requires_grad=False)
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]), self.weight)
        return y.reshape(shape[:-1] + (y.shape[-1],))

    def part_rows(self, part: int) -> slice:
        start = sum(self.output_sizes[:part])
        return slice(start, start + self.output_sizes[part])
