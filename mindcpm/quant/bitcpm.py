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


def ternary_group_size(w: np.ndarray) -> int | None:
    """The largest group size (a whole row, else 256 ... 32) under which every group of w [N, K]
    (fp32) is exactly {-s, 0, +s}; None when there is none."""
    k = w.shape[1]
    for group_size in (k, *GROUP_SIZES):
        if k % group_size == 0 and group_size % 32 == 0 and ternary_scales(w, group_size) is not None:
            return group_size
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
    group_size = ternary_group_size(w)
    if group_size is None:
        raise QuantError(f"{name} is not ternary: some group of 32 inputs holds more than {{-s, 0, +s}}")
    check_layout(2, k, group_size, name)
    s = ternary_scales(w, group_size)
    scales = to_stored(s, scale_dtype)
    sign = np.sign(w.reshape(n, k // group_size, group_size)).astype(np.int8)
    codes = (sign + 2).astype(np.uint8).reshape(n, k)
    return QuantWeight(pack_codes(codes, 2), scales, None, 2, group_size, scale_dtype)


def ternary_checkpoint(weights: dict, scale_dtype: str = "bfloat16") -> dict:
    """name -> QuantWeight for every 2-D weight of a BitCPM checkpoint (iteration order); the
    first tensor that is not exactly ternary stops the load with its name."""
    return {name: ternary_weight(w, scale_dtype, name) for name, w in weights.items()}


# A real ternary projection rounds about a third of its weights to 0 (|w| < s / 2 with s the
# group's mean |w|); one that is all zero, or has hardly any zeros or hardly anything else (a
# constant or an identity matrix) is trivially ternary and not taken for BitCPM.
ZERO_SHARE = (0.05, 0.95)


def probe_checkpoint(path: str) -> tuple[str, int] | None:
    """(tensor name, group size) when the checkpoint at `path` looks like BitCPM: its first
    decoder projection (layer 0's q_proj, else its first *_proj) is exactly ternary per group and
    zero in a real share of it. Reads that one tensor, and only its first row when that already
    is not ternary (an ordinary checkpoint costs one row). None for anything else, including a
    checkpoint the loader will refuse (it names the problem then)."""
    from ..loader import CheckpointError, checkpoint_files
    try:
        files = checkpoint_files(path)
    except CheckpointError:
        return None
    from safetensors import SafetensorError, safe_open
    for file, names in files.items():
        try:
            with safe_open(file, framework="np") as handle:
                name = first_projection(handle.keys() if names is None else names)
                if name is None:
                    continue
                tensor = handle.get_slice(name)
                if len(tensor.get_shape()) != 2 or ternary_group_size(tensor[:1].astype(np.float32)) is None:
                    return None
                w = tensor[:].astype(np.float32, copy=False)
        except (SafetensorError, OSError, ValueError, TypeError):
            return None
        zeros = np.count_nonzero(w == 0) / w.size
        group_size = ternary_group_size(w)
        if group_size is None or not ZERO_SHARE[0] <= zeros <= ZERO_SHARE[1]:
            return None
        return name, group_size
    return None


def first_projection(names) -> str | None:
    """Layer 0's q_proj weight, else the first (by name) of its *_proj weights; None if it has none."""
    layer0 = sorted(n for n in names if ".layers.0." in f".{n}" and n.endswith("proj.weight"))
    return next((n for n in layer0 if n.endswith(".q_proj.weight")), layer0[0] if layer0 else None)
