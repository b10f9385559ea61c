from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..ops.device import Device
from ..parallel import Shard, even_rows, tp_group


class RMSNorm(nn.Cell):
    """Variance in fp32; the weight multiplies after the cast back to the input dtype (docs/minicpm4.md#rmsnorm-precision).

    `sharded`: the normalised features are split across tensor-parallel ranks (MiniMax's norm over
    all H*D lightning features, docs/minimax.md#lightning-output-norm-and-gate): each rank holds its slice of the weight and
    the sum of squares is summed over the ranks before the mean."""

    def __init__(self, size: int, eps: float, dtype=ms.float32, sharded: bool = False, device: Device | None = None):
        super().__init__()
        device = device or Device()
        self.eps, self.size = eps, size
        self.rows = even_rows(size, "normalised features") if sharded else slice(0, size)
        self.weight = Parameter(Tensor(np.ones(self.rows.stop - self.rows.start), dtype), name="weight",
                                requires_grad=False)
        self.norm = device.rms_norm(eps)
        self.all_reduce = ops.AllReduce() if sharded and tp_group().size > 1 else None

    def construct(self, x):
        if self.all_reduce is None:
            return self.norm(x, self.weight)
        x32 = x.astype(ms.float32)
        variance = self.all_reduce((x32 * x32).sum(-1, keepdims=True)) / self.size
        return (x32 * ops.rsqrt(variance + self.eps)).astype(x.dtype) * self.weight

    def checkpoint_shard(self, part) -> Shard:
        return Shard((self.size,), (self.rows,), ())
