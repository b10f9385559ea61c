"""The AscendC custom ops (kernels_aclnn/*/op_host + op_kernel) behind the Device on Ascend.

Built and installed by `bash kernels_aclnn/ascendc_common/build_npu.sh <install_path>`, they are
found as MindSpore 2.10 finds a custom AscendC op: its aclnn header
(`op_api/include/aclnn_<snake_name>.h`) in a folder of ASCEND_CUSTOM_OPP_PATH, or in a vendor of
$ASCEND_OPP_PATH/vendors. They are called through ops.Custom with the op's name and func_type
"aot" (MindSpore's Ascend path for AscendC ops; its registration info is generated from the
installed op), shape and dtype inferred here in Python, the op's attributes as trailing scalar
inputs. Where they are missing, the Device uses the composites (ops/lightning.py,
layers/sparse.py), which are also the reference they are checked against.

Contracts (kernels_aclnn/*/op_host/*.cpp):
  LightningDecode(q, k, v [B,H,D] 16-bit, slopes [H] fp32, state_pool [S,H,D,D] fp32 in place,
                  state_slots [B] int32, positions [B] int32) -> o [B, H*D] fp32
  LightningPrefill(the same with q, k, v [B,L,H,D], positions [B,L]) -> o [B, L, H*D] fp32
  InfllmBlockSelect(q [B,L,Hq,D], c1, c2 [E,Hkv,D], positions, c1_table [B,N1], c2_table [B,N2];
                  scale, init_blocks, window_blocks, topk, dense_len, current, repeat)
                  -> selected [B, Hkv, L, (N1+1)/4] int32
  InfllmSparseAttention(q, k_cache, v_cache [S,Hkv,D], positions, block_tables [B,P], selected;
                  scale, page_size) -> [B, L, Hq*D] in q's dtype
-1 marks padding (positions, state_slots); the prefill kernel takes padding only at the end of a
row, which is how the runner lays out every step (engine/runner.py prepare).

`custom_op` and `built_ops_path` are module-level so that tests can stand the CPU emulation of
the same kernel sources in for the built ops (tests/ascendc_standins.py).
"""
from __future__ import annotations

import os
import re
import sys

import mindspore as ms
from mindspore import nn, ops

OPS = ("LightningDecode", "LightningPrefill", "InfllmBlockSelect", "InfllmSparseAttention")
BUILD_COMMAND = "bash kernels_aclnn/ascendc_common/build_npu.sh <install_path>"
ACTIVATION_DTYPES = (ms.float16, ms.bfloat16)


# -- finding and calling the built ops ---------------------------------------------------------
def _header(op: str) -> str:
    """aclnn_<snake_case>.h, the header MindSpore reads an installed op's signature from."""
    snake = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", op)).lower()
    return f"aclnn_{snake}.h"


def _candidate_dirs() -> list[str]:
    dirs = [d for d in os.environ.get("ASCEND_CUSTOM_OPP_PATH", "").split(":") if d]
    vendors = os.path.join(os.environ.get("ASCEND_OPP_PATH", ""), "vendors")
    if os.path.isdir(vendors):
        dirs += sorted(os.path.join(vendors, v) for v in os.listdir(vendors))
    return dirs


def built_ops_path() -> str | None:
    """The installed vendor folder that holds all four ops, or None."""
    for d in _candidate_dirs():
        if all(os.path.isfile(os.path.join(d, "op_api", "include", _header(op))) for op in OPS):
            return d
    return None


class _AclnnOp(nn.Cell):
    """An installed AscendC op with its attributes fixed: called with its tensors only."""

    def __init__(self, name: str, attrs: tuple, out_shape, out_dtype):
        super().__init__()
        self.op = ops.Custom(name, out_shape=out_shape, out_dtype=out_dtype, func_type="aot", bprop=None)
        self.attrs = attrs

    def construct(self, *tensors):
        return self.op(*tensors, *self.attrs)


def custom_op(name: str, attrs: tuple, out_shape, out_dtype) -> nn.Cell:
    """The op `name` of OPS with attribute values `attrs` (in its Attr order)."""
    return _AclnnOp(name, attrs, out_shape, out_dtype)


_warned = False


def available() -> bool:
    """Whether the built ops are there; if not, says once (one line) how to build them."""
    global _warned
    if built_ops_path() is not None:
        return True
    if not _warned:
        _warned = True
        print(f"mindcpm: the AscendC ops for lightning attention and InfLLM-v2 are not installed, so MindSpore "
              f"composites run instead; build them with `{BUILD_COMMAND}` and add <install_path>/vendors/customize "
              f"to ASCEND_CUSTOM_OPP_PATH", file=sys.stderr, flush=True)
    return False


# -- output shapes and dtypes (the ops' InferShape / InferDataType) ------------------------------
def _merge_heads(q, *_):
    return list(q[:-2]) + [q[-2] * q[-1]]


def _fp32(*_):
    return ms.float32


def _selected_shape(q, c1, c2, positions, c1_table, *_):
    return [q[0], c1[1], q[1], (c1_table[1] + 1) // 4]


def _int32(*_):
    return ms.int32


def _like_q(q, *_):
    return q


# -- the ops as the Device hands them out -----------------------------------------------------------
class AscendCLightning(nn.Cell):
    """Lightning attention on LightningDecode / LightningPrefill, with NativeLightning's call:
    q, k, v are cast to the 16-bit model dtype the kernels take (the state, decays and the output
    stay fp32 in the kernels)."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype
        self.decode = custom_op("LightningDecode", (), _merge_heads, _fp32)
        self.prefill = custom_op("LightningPrefill", (), _merge_heads, _fp32)

    def construct(self, q, k, v, slopes, state_pool, state_slots, positions, block):
        """block: the composite's block length; the kernels tile by their own."""
        b, l, h, d = q.shape
        q, k, v = q.astype(self.dtype), k.astype(self.dtype), v.astype(self.dtype)
        if l == 1:
            o = self.decode(q.reshape(b, h, d), k.reshape(b, h, d), v.reshape(b, h, d), slopes, state_pool,
                            state_slots, positions.reshape(b))
            return o.reshape(b, 1, h * d)
        return self.prefill(q, k, v, slopes, state_pool, state_slots, positions)


def block_select(scale: float, init_blocks: int, window_blocks: int, topk: int, dense_len: int, current: bool,
                 repeat: float) -> nn.Cell:
    """InfllmBlockSelect(q, c1_cache, c2_cache, positions, c1_table, c2_table) -> selected."""
    attrs = (float(scale), int(init_blocks), int(window_blocks), int(topk), int(dense_len), int(current),
             float(repeat))
    return custom_op("InfllmBlockSelect", attrs, _selected_shape, _int32)


def sparse_attention(scale: float, page_size: int) -> nn.Cell:
    """InfllmSparseAttention(q, k_cache, v_cache, positions, block_tables, selected) -> [B, L, Hq*D]."""
    return custom_op("InfllmSparseAttention", (float(scale), int(page_size)), _merge_heads, _like_q)
