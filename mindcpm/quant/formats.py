"""QuantWeight: the one layout of a quantized weight [N, K] that the CPU kernel reads.

Each row is cut into groups of G consecutive inputs (G = K: one group a row, "per channel").
Codes c are unsigned, `bits` wide (8, 4 or 2), and dequantize to
    w = s * (c - 2^(bits-1))   symmetric (offsets None)
    w = s * c + m              asymmetric (offsets m, like GGUF's Q4_1)
with s (and m) per row and group, stored as float32, float16 or bfloat16 (kept as its uint16
bits: numpy has no bfloat16). Codes are packed along each row in blocks of 32 inputs so that a
SIMD load of one block yields consecutive codes (4-bit is GGUF's Q4_0/Q4_1 block as is):
    8-bit  byte k = c[k]
    4-bit  16 bytes a block: byte j = c[j] | c[j + 16] << 4
    2-bit  8 bytes a block:  byte j = c[j] | c[j + 8] << 2 | c[j + 16] << 4 | c[j + 24] << 6
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCALE_DTYPES = ("float32", "float16", "bfloat16")
BLOCK = 32  # inputs per packing block of the 4- and 2-bit layouts


class QuantError(ValueError):
    """A weight or setting the quantized path cannot take; the message is one line."""


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = u + 0x7FFF + ((u >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> their exact float32 values."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to `dtype` as QuantWeight keeps them."""
    if dtype == "bfloat16":
        return bf16_bits(values)
    if dtype in ("float32", "float16"):
        return np.asarray(values, np.float32).astype(dtype)
    raise QuantError(f"unsupported scale dtype {dtype!r}; choose one of {', '.join(SCALE_DTYPES)}")


def stored_values(stored: np.ndarray, dtype: str) -> np.ndarray:
    """The exact float32 values of scales / offsets kept as `dtype`."""
    return bf16_values(stored) if dtype == "bfloat16" else stored.astype(np.float32)


def check_layout(bits: int, k: int, group_size: int, name: str = "weight") -> None:
    """Raises QuantError (one line naming `name`) when the kernel cannot take this shape."""
    if bits not in (8, 4, 2):
        raise QuantError(f"{name}: {bits}-bit codes are not supported (8, 4 or 2)")
    if group_size <= 0 or k % group_size:
        raise QuantError(f"{name}: group size {group_size} does not divide the input dimension {k}")
    if bits < 8 and group_size % BLOCK:
        raise QuantError(f"{name}: {bits}-bit groups must be a multiple of {BLOCK} inputs, not {group_size}")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [N, K] (values < 2^bits) -> packed [N, K * bits / 8] uint8 in the layout above."""
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return np.ascontiguousarray(codes)
    n, k = codes.shape
    per = 8 // bits  # codes a byte; a block's byte j holds codes j, j + 32/per, ...
    blocks = codes.reshape(n, k // BLOCK, per, BLOCK // per)
    packed = np.zeros((n, k // BLOCK, BLOCK // per), np.uint8)
    for i in range(per):
        packed |= blocks[:, :, i, :] << np.uint8(i * bits)
    return packed.reshape(n, k * bits // 8)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of pack_codes: [N, K * bits / 8] uint8 -> codes [N, K] uint8."""
    if bits == 8:
        return packed
    n, width = packed.shape
    per = 8 // bits
    blocks = packed.reshape(n, -1, 1, BLOCK // per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).reshape(1, 1, per, 1)
    return ((blocks >> shifts) & np.uint8((1 << bits) - 1)).reshape(n, width * per)


@dataclass
class QuantWeight:
    """A weight [N, K] kept quantized; see the module docstring for the meaning of each field.
    input_perm (GPTQ act-order): the kernel's input k is the layer's input input_perm[k]."""
    packed: np.ndarray            # [N, K * bits / 8] uint8
    scales: np.ndarray            # [N, K / group_size] in scale_dtype (bfloat16 as uint16 bits)
    offsets: np.ndarray | None    # like scales; None = symmetric
    bits: int
    group_size: int
    scale_dtype: str
    input_perm: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 8 // self.bits

    @property
    def nbytes(self) -> int:
        """Bytes a GEMV streams: codes, scales and offsets."""
        return self.packed.nbytes + self.scales.nbytes + (0 if self.offsets is None else self.offsets.nbytes)

    def codes(self) -> np.ndarray:
        return unpack_codes(self.packed, self.bits)

    def take_rows(self, index) -> "QuantWeight":
        """The weight of rows `index` (a slice or indices: a tensor-parallel shard of the outputs,
        or a row permutation such as GGUF's q/k un-permutation); rows are independent."""
        offsets = None if self.offsets is None else self.offsets[index]
        return QuantWeight(np.ascontiguousarray(self.packed[index]), np.ascontiguousarray(self.scales[index]),
                           offsets if offsets is None else np.ascontiguousarray(offsets), self.bits, self.group_size,
                           self.scale_dtype, self.input_perm)

    def take_inputs(self, inputs: slice, name: str = "weight") -> "QuantWeight":
        """The weight of the inputs `inputs` (a row-parallel tensor-parallel shard). Codes are
        never re-quantized, so the slice must hold whole groups, which for 4 and 2 bits are whole
        packing blocks too; QuantError (one line naming `name`) otherwise."""
        n, k = self.shape
        start, stop, step = inputs.indices(k)
        if (start, stop, step) == (0, k, 1):
            return self
        if self.input_perm is not None:  # a rank's inputs would be scattered over every group
            raise QuantError(f"{name}: a GPTQ act-order (desc_act) weight cannot be split by its inputs, as a "
                             f"row-parallel projection is for tensor parallelism; run it on one rank")
        if step != 1 or start % self.group_size or stop % self.group_size:
            raise QuantError(f"{name}: inputs {start}:{stop} of {k} do not hold whole groups of {self.group_size} "
                             f"(a tensor-parallel rank's share of a row-parallel projection's inputs)")
        codes = slice(start * self.bits // 8, stop * self.bits // 8)
        groups = slice(start // self.group_size, stop // self.group_size)
        offsets = None if self.offsets is None else np.ascontiguousarray(self.offsets[:, groups])
        return QuantWeight(np.ascontiguousarray(self.packed[:, codes]), np.ascontiguousarray(self.scales[:, groups]),
                           offsets, self.bits, self.group_size, self.scale_dtype)

    def dequantize(self) -> np.ndarray:
        """The fp32 weight [N, K] the codes stand for (in the kernel's input order)."""
        n, k = self.shape
        groups = k // self.group_size
        codes = self.codes().reshape(n, groups, self.group_size).astype(np.float32)
        s = stored_values(self.scales, self.scale_dtype)[:, :, None]
        if self.offsets is None:
            w = s * (codes - np.float32(1 << (self.bits - 1)))
        else:
            w = s * codes + stored_values(self.offsets, self.scale_dtype)[:, :, None]
        return w.reshape(n, k)


def concat_rows(parts: list[QuantWeight], name: str = "weight") -> QuantWeight:
    """Weights stacked along their outputs (q|k|v, gate|up), which must share one format."""
    first = parts[0]
    for part in parts[1:]:
        same = (part.bits, part.group_size, part.scale_dtype, part.offsets is None, part.shape[1]) == \
            (first.bits, first.group_size, first.scale_dtype, first.offsets is None, first.shape[1])
        perms = (part.input_perm is None and first.input_perm is None) or \
            (part.input_perm is not None and first.input_perm is not None and
             np.array_equal(part.input_perm, first.input_perm))
        if not same:
            raise QuantError(f"{name}: the parts to fuse are quantized differently ({first.bits}-bit group "
                             f"{first.group_size} {first.scale_dtype} vs {part.bits}-bit group {part.group_size} "
                             f"{part.scale_dtype})")
        if not perms:  # GPTQ orders a layer's inputs by their statistics: q/k/v (gate/up) read the same ones
            raise QuantError(f"{name}: the parts to fuse read their inputs in different act-order (g_idx) orders")
    offsets = None if first.offsets is None else np.concatenate([p.offsets for p in parts])
    return QuantWeight(np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]), offsets,
                       first.bits, first.group_size, first.scale_dtype, first.input_perm)
