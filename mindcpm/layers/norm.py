from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops


class RMSNorm(nn.Cell):
    """Variance in fp32; the weight multiplies after the cast back to the input dtype (spec §2.1)."""

    def __init__(self, size: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(Tensor(np.ones(size), dtype), name="weight", requires_grad=False)

    def construct(self, x):
        x32 = x.astype(ms.float32)
        variance = ops.mean(x32 * x32, -1, keep_dims=True)
        return (x32 * ops.rsqrt(variance + self.eps)).astype(x.dtype) * self.weight
