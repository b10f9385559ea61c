"""Round-to-nearest group-wise quantization of a float weight [N, K] (int8 / int4, sym or asym)."""
from __future__ import annotations

import numpy as np

from .formats import QuantError, QuantWeight, check_layout, pack_codes, stored_values, to_stored

# quantization name (vLLM's spelling of LLM(quantization=...)) -> (bits, default group size; None = per channel)
METHODS = {"int8": (8, None), "int4": (4, 128)}


def method_settings(name: str, group_size: int | None = None) -> tuple[int, int | None]:
    """(bits, group size) of a quantize-on-load method; QuantError naming an unknown one."""
    if name not in METHODS:
        raise QuantError(f"unknown quantization {name!r}; choose {' or '.join(METHODS)}")
    bits, default = METHODS[name]
    return bits, default if group_size is None else group_size


def quantize(weight: np.ndarray, bits: int, group_size: int | None = None, symmetric: bool = True,
             scale_dtype: str = "float32", name: str = "weight") -> QuantWeight:
    """weight [N, K] (fp32, or bf16 widened to fp32) -> QuantWeight; group_size None = K.
    Symmetric: s = max|w| / (2^(bits-1) - 1), c = round(w / s) + 2^(bits-1).
    Asymmetric: s = (max - min) / (2^bits - 1), m = min, c = round((w - m) / s).
    Codes are computed from the scales as stored (rounded to scale_dtype), so dequantizing gives
    the nearest representable value on the stored grid."""
    w = np.asarray(weight, np.float32)
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {w.shape}")
    n, k = w.shape
    group_size = k if group_size is None else group_size
    check_layout(bits, k, group_size, name)
    groups = k // group_size
    codes = np.empty((n, k), np.uint8)
    scales = offsets = None
    # A few rows at a time: the temporaries stay small next to the weight (peak memory on load).
    for r in range(0, n, ROWS_AT_ONCE):
        rows = slice(r, r + ROWS_AT_ONCE)
        g = w[rows].reshape(-1, groups, group_size)
        part = _quantize_groups(g, bits, symmetric, scale_dtype)
        if scales is None:
            scales = np.empty((n, groups), part[1].dtype)
            offsets = None if symmetric else np.empty((n, groups), part[2].dtype)
        codes[rows], scales[rows] = part[0].reshape(-1, k), part[1]
        if offsets is not None:
            offsets[rows] = part[2]
    return QuantWeight(pack_codes(codes, bits), scales, offsets, bits, group_size, scale_dtype)


ROWS_AT_ONCE = 256


def _quantize_groups(g: np.ndarray, bits: int, symmetric: bool, scale_dtype: str):
    """(codes uint8, scales, offsets or None) of groups g [rows, groups, G] (quantize's rules)."""
    top = (1 << bits) - 1
    if symmetric:
        center = 1 << (bits - 1)
        scales = to_stored(np.abs(g).max(-1) / (center - 1), scale_dtype)
        s = stored_values(scales, scale_dtype)[:, :, None]
        q = np.divide(g, s, out=np.zeros_like(g), where=s != 0)
        np.round(q, out=q)
        q += center
        offsets = None
    else:
        lo, hi = g.min(-1), g.max(-1)
        scales, offsets = to_stored((hi - lo) / top, scale_dtype), to_stored(lo, scale_dtype)
        s = stored_values(scales, scale_dtype)[:, :, None]
        m = stored_values(offsets, scale_dtype)[:, :, None]
        q = np.divide(g - m, s, out=np.zeros_like(g), where=s != 0)
        np.round(q, out=q)
    # In place: loading holds as few fp32 copies of a slab as it can.
    return np.clip(q, 0, top, out=q).astype(np.uint8), scales, offsets
