"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum, as vLLM and transformers load them) unpacked
into QuantWeight. Per linear layer with K inputs, N outputs, b bits, p = 32 / b codes an int32:
    qweight [K / p, N] int32   input k of output n: bits b*(k % p) of qweight[k // p, n]
    qzeros  [K / G, N / p]     zero of group g, output n: bits b*(n % p) of qzeros[g, n // p]
    scales  [K / G, N] fp16
    g_idx   [K] int32          the group of input k (k // G unless act-order reordered them)
    w[n, k] = scales[g, n] * (q[k, n] - z[g, n]),  g = g_idx[k]
The stored zero is z - 1 in the original ("gptq", v1) checkpoint format and z in "gptq_v2".
Supported: bits 4 and 8; sym true or false; checkpoint_format "gptq" or "gptq_v2"; group_size -1
(whole rows) or a divisor of K (a multiple of 32 for 4-bit); desc_act true or false. Act-order
(desc_act true, g_idx not k // G): the codes are sorted by group so that each group is contiguous,
and QuantWeight.input_perm says which input each sorted position is; layers/linear.py gathers x
into that order. g_idx must give every group exactly G inputs (GPTQ always does). Anything else
is refused in one line naming the setting or the tensor."""
from __future__ import annotations

import json
import os

import numpy as np

from .formats import QuantError, QuantWeight, check_layout, pack_codes, to_stored

SUPPORTED_BITS = (4, 8)
FORMATS = ("gptq", "gptq_v2")


def read_config(model_dir: str) -> dict | None:
    """The GPTQ settings of a checkpoint directory (config.json's quantization_config, else
    quantize_config.json), validated; None when the checkpoint is not quantized."""
    config = None
    path = os.path.join(model_dir, "config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f).get("quantization_config")
    path = os.path.join(model_dir, "quantize_config.json")
    if config is None and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            config = dict(json.load(f), quant_method="gptq")
    return None if config is None else check_config(config)


def check_config(config: dict) -> dict:
    """{bits, group_size, sym, desc_act, checkpoint_format} of a GPTQ quantization config;
    QuantError (one line naming the setting) for anything this loader does not support."""
    method = config.get("quant_method", "gptq")
    if method != "gptq":
        raise QuantError(f"quantization method {method!r} is not supported (only GPTQ checkpoints)")
    fmt = config.get("checkpoint_format", "gptq")
    if fmt not in FORMATS:
        raise QuantError(f"GPTQ checkpoint_format {fmt!r} is not supported ({' or '.join(FORMATS)})")
    bits = config.get("bits")
    if bits not in SUPPORTED_BITS:
        raise QuantError(f"GPTQ bits={bits} is not supported (4 or 8)")
    group_size = config.get("group_size", -1)
    if not isinstance(group_size, int) or group_size == 0 or group_size < -1:
        raise QuantError(f"GPTQ group_size={group_size!r} is not supported (-1 or a positive size)")
    return {"bits": bits, "group_size": group_size, "sym": bool(config.get("sym", True)),
            "desc_act": bool(config.get("desc_act", False)), "checkpoint_format": fmt}


def unpack_int32(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> their 32 / bits codes each, lowest bits first, spread along `axis`."""
    words = np.ascontiguousarray(packed).view(np.uint32)
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    codes = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)  # [..., per] after the axis
    codes = np.moveaxis(codes, -1, axis + 1)
    shape = list(words.shape)
    shape[axis] *= per
    return codes.reshape(shape).astype(np.uint8)


def check_g_idx(g_idx, k: int, groups: int, name: str) -> np.ndarray:
    """g_idx as int64 when it assigns each of the k inputs to one of the groups, group_size = k /
    groups inputs each (as GPTQ, act-order or not, always does); QuantError naming the tensor."""
    g_idx = np.asarray(g_idx)
    if g_idx.shape != (k,) or g_idx.dtype.kind not in "iu":
        raise QuantError(f"{name}.g_idx is {g_idx.dtype} {list(g_idx.shape)}, not one integer group index per "
                         f"input ({k})")
    g_idx = g_idx.astype(np.int64)
    outside = (g_idx < 0) | (g_idx >= groups)
    if outside.any():
        raise QuantError(f"{name}.g_idx puts input {np.argmax(outside)} in group {g_idx[outside][0]}; "
                         f"the scales have groups 0..{groups - 1}")
    counts = np.bincount(g_idx, minlength=groups)
    if np.any(counts != k // groups):
        group = int(np.argmax(counts != k // groups))
        raise QuantError(f"{name}.g_idx gives group {group} {counts[group]} inputs, not {k // groups}")
    return g_idx


def from_gptq(qweight, qzeros, scales, g_idx, config: dict, name: str = "layer") -> QuantWeight:
    """One layer's GPTQ tensors (numpy) -> QuantWeight [N, K]. Symmetric checkpoints keep their
    fp16 scales; asymmetric ones get fp32 scales and offsets m = -s z, both exact (an fp16 scale
    times a code of at most 8 bits fits float32's mantissa), so dequantizing is bit-exact."""
    bits = config["bits"]
    codes = unpack_int32(qweight, bits, 0).T               # [N, K]
    zeros = unpack_int32(qzeros, bits, 1).astype(np.int32)  # [groups, N]
    if config["checkpoint_format"] == "gptq":
        zeros = (zeros + 1) & ((1 << bits) - 1)
    n, k = codes.shape
    s = np.asarray(scales).astype(np.float32)
    groups = s.shape[0]
    if s.shape != (groups, n) or zeros.shape[1] < n or k % groups:
        raise QuantError(f"{name}: GPTQ tensors disagree (qweight {qweight.shape}, qzeros {qzeros.shape}, "
                         f"scales {s.shape})")
    zeros = zeros[:, :n]
    group_size = k // groups
    perm = None
    g_idx = np.arange(k) // group_size if g_idx is None else check_g_idx(g_idx, k, groups, name)
    if np.any(g_idx != np.arange(k) // group_size):
        if not config["desc_act"]:
            raise QuantError(f"{name}.g_idx reorders the inputs but desc_act is false")
        perm = np.argsort(g_idx, kind="stable")  # the inputs of group 0, then group 1, ...
        codes = codes[:, perm]
    check_layout(bits, k, group_size, name)
    center = 1 << (bits - 1)
    if np.all(zeros == center):
        return QuantWeight(pack_codes(codes, bits), np.ascontiguousarray(np.asarray(scales).T.astype(np.float16)),
                           None, bits, group_size, "float16", perm)
    st = np.ascontiguousarray(s.T)
    offsets = to_stored(-st * zeros.T.astype(np.float32), "float32")
    return QuantWeight(pack_codes(codes, bits), st, offsets, bits, group_size, "float32", perm)
