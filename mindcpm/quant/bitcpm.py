"""BitCPM ternary weights: a fake-quantized checkpoint stores each group's weights as exactly
{-s, 0, +s} in an ordinary float tensor (s = that group's scale). Verified exactly ternary, they
pack to 2-bit codes c = w / s + 2 (QuantWeight's symmetric 2-bit form) with s kept in the
checkpoint's dtype, so nothing is lost. Apply it to the linear weights only (embeddings and
norms are not ternary)."""
from __future__ import annotations

import numpy as np

from .formats import QuantError, QuantWeight, check_layout, pack_codes, to_stored

# Group sizes tried, largest first after a whole row: one scale per row is the smallest form.
GROUP_SIZES = (256, 128, 64, 32)


def ternary_scales(weight: np.ndarray, group_size: int) -> np.ndarray | None:
    """Per-group scales [N, K / group_size] when every group of `weight` is exactly {-s, 0, +s}, else None."""
    n, k = weight.shape
    g = np.abs(weight.reshape(n, k // group_size, group_size))
    s = g.max(-1)
    if np.all((g == 0) | (g == s[:, :, None])):
        return s
    return None


def ternary_weight(weight: np.ndarray, scale_dtype: str = "bfloat16", name: str = "weight") -> QuantWeight:
    """weight [N, K]: fp32 values (bf16/fp16 checkpoints widened exactly) -> 2-bit QuantWeight with
    the largest group size (a whole row, else 256 ... 32) under which it is exactly ternary.
    scale_dtype: the checkpoint's dtype, in which every scale is exact. Raises QuantError naming
    `name` when no group size works."""
    w = np.asarray(weight, np.float32)
    n, k = w.shape
    if k % 32:
        raise QuantError(f"{name}: input dimension {k} is not a multiple of 32, which 2-bit packing needs")
    for group_size in (k, *GROUP_SIZES):
        if k % group_size or group_size % 32:
            continue
        s = ternary_scales(w, group_size)
        if s is not None:
            break
    else:
        raise QuantError(f"{name} is not ternary: some group of 32 inputs holds more than {{-s, 0, +s}}")
    check_layout(2, k, group_size, name)
    scales = to_stored(s, scale_dtype)
    sign = np.sign(w.reshape(n, k // group_size, group_size)).astype(np.int8)
    codes = (sign + 2).astype(np.uint8).reshape(n, k)
    return QuantWeight(pack_codes(codes, 2), scales, None, 2, group_size, scale_dtype)


def ternary_checkpoint(weights: dict, scale_dtype: str = "bfloat16") -> dict:
    """name -> QuantWeight for every 2-D weight of a BitCPM checkpoint (iteration order); the
    first tensor that is not exactly ternary stops the load with its name."""
    return {name: ternary_weight(w, scale_dtype, name) for name, w in weights.items()}
