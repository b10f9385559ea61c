"""GGUF's Q8_0 / Q4_0 / Q4_1 blocks kept quantized: their bytes regrouped into a QuantWeight,
which dequantizes bit-exactly like gguf-py. Each block covers 32 consecutive inputs of a row:
    Q8_0  34 bytes: fp16 d, 32 int8 q            w = d * q
    Q4_0  18 bytes: fp16 d, 16 bytes of nibbles   w = d * (c - 8)
    Q4_1  20 bytes: fp16 d, fp16 m, 16 bytes      w = d * c + m
(the nibbles: byte j = c[j] | c[j + 16] << 4, which is QuantWeight's 4-bit layout as is.)
Other types (Q4_K, Q6_K, ...) have no kernel here: kept_quantized() says so and the loader
dequantizes them to fp32 as before."""
from __future__ import annotations

import numpy as np

from .formats import BLOCK, QuantError, QuantWeight

# type name -> (bytes a block, bytes of fp16 header fields, code bits)
BLOCK_TYPES = {"Q8_0": (34, 1, 8), "Q4_0": (18, 1, 4), "Q4_1": (20, 2, 4)}


def kept_quantized(type_name: str) -> bool:
    """Whether tensors of this GGUF type (e.g. "Q4_1") run quantized."""
    return type_name in BLOCK_TYPES


def from_gguf(data: np.ndarray, type_name: str, shape: tuple[int, int], name: str = "tensor") -> QuantWeight:
    """data: the tensor's raw bytes (uint8, any shape) of a [N, K] weight (row-major, K inputs)."""
    if type_name not in BLOCK_TYPES:
        raise QuantError(f"{name}: GGUF type {type_name} has no quantized kernel (supported: "
                         f"{', '.join(BLOCK_TYPES)})")
    size, fields, bits = BLOCK_TYPES[type_name]
    n, k = shape
    if k % BLOCK or np.asarray(data).size != n * k // BLOCK * size:
        raise QuantError(f"{name}: {np.asarray(data).size} bytes are not a {type_name} [{n}, {k}] tensor")
    blocks = np.ascontiguousarray(data, np.uint8).reshape(n, k // BLOCK, size)
    header = blocks[:, :, :2 * fields].copy().view(np.float16)  # [N, K/32, fields]
    body = blocks[:, :, 2 * fields:]
    if bits == 8:  # int8 q -> unsigned code q + 128 (the symmetric center)
        packed = (body ^ np.uint8(0x80)).reshape(n, k)
    else:
        packed = body.reshape(n, k // 2)
    offsets = header[:, :, 1].copy() if fields == 2 else None
    return QuantWeight(np.ascontiguousarray(packed), header[:, :, 0].copy(), offsets, bits, BLOCK, "float16")


def from_reader_tensor(tensor) -> QuantWeight | None:
    """A gguf.GGUFReader tensor kept quantized, or None when its type has no kernel (or it is not
    a matrix). GGUF lists dims fastest first: [K, N] there is the row-major [N, K] weight."""
    type_name = tensor.tensor_type.name
    if not kept_quantized(type_name) or len(tensor.shape) != 2:
        return None
    k, n = (int(d) for d in tensor.shape)
    return from_gguf(tensor.data, type_name, (n, k), tensor.name)
