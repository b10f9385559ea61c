from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from ..ops import rms_norm


class RMSNorm(nn.Cell):
    """Variance in fp32; the weight multiplies after the cast back to the input dtype (spec §2.1)."""

    def __init__(self, size: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(Tensor(np.ones(size), dtype), name="weight", requires_grad=False)
        self.norm = rms_norm(eps)

    def construct(self, x):
        return self.norm(x, self.weight)
