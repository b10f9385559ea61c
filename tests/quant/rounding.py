"""The documented error of the quantized kernel's int16 paths (kernels_aclnn/common/quant_gemv.inc):
on the SIMD paths, decode and (by default) the GEMM round x to int16 per block of 32 inputs before
it meets the codes. Both round the same blocks the same way and sum the products exactly in
int32, so one bound covers both."""
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


# mindcpm's fused projections and the transformers modules that read the same input
HF_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def quantized_projections(llm) -> list[str]:
    """The transformers Llama modules of `llm`'s quantized projections (its LM head included)."""
    names = []
    for name, cell in llm.engine.runner.model.cells_and_names():
        if not hasattr(cell, "weight_packed") or not hasattr(cell, "in_features"):
            continue
        if name.endswith("lm_head"):
            names.append("lm_head")
            continue
        parent, proj = name.rsplit(".", 1)
        names += [f"model.{parent}.{part}" for part in HF_PARTS.get(proj, (proj,))]
    return names
