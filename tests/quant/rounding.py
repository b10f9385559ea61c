"""The documented error of the quantized kernel's int16 paths (kernels_aclnn/common/quant_gemv.inc):
on the SIMD paths, decode (and the GEMM, with int16 activations asked for) rounds x to int16 per block
of 32 inputs before it meets the codes. Both round the same blocks the same way and sum the products
exactly in int32, so one bound covers both."""
from __future__ import annotations

import numpy as np


def x_rounding_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """|x^ W^T - x W^T| elementwise, for x [M, K] rounded as the kernel does (|x^ - x| <= max_b|x| / 65534
    in block b) and the dense weight w [N, K]: sum_b max_b|x| / 65534 sum_{k in b} |w_k|. 0 where K is
    not whole blocks (the kernel keeps fp32 x there)."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    m, k = x.shape
    if k % 32:
        return np.zeros((m, w.shape[0]))
    block_max = np.abs(x).reshape(m, k // 32, 32).max(-1)
    block_w = np.abs(np.asarray(w, np.float64)).reshape(w.shape[0], k // 32, 32).sum(-1)
    return block_max @ block_w.T / 65534
