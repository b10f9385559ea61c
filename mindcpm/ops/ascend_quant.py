"""Weight-only quantized linears on Ascend (W8A16, W4A16): aclnn WeightQuantBatchMatmul computes
x @ ((weight + antiquant_offset) * antiquant_scale) with weight [K, N] (not transposed), scale and
offset [N] (per output channel, antiquant_group_size 0) or [K / G, N] (groups of G inputs), all in
x's dtype (fp16 or bf16). The group size is read off the scale's shape when the graph is traced,
so a checkpoint's own group (GGUF's 32, a GPTQ file's) needs nothing fixed when the model is built;
it goes to the functional form, whose group is an input that MindSpore's Ascend kernel reads at
launch like the primitive's (weight_quant_batch_matmul_aclnn_kernel.cc, read in the
mindspore-ai/mindspore_test mirror).

Vendor limits (CANN's aclnnWeightQuantBatchMatmulV2 documentation, Atlas A2/A3): G a multiple of
32 below K (a whole row is the per-channel mode instead), K and N at most 65535, and an int4
weight's inner dimension even. MindSpore's own inference checks none of these (it checks dtypes
and K), so they are checked here, one line each.

Weights: int8 [K, N], or int4 as MindSpore's qint4x2 [K, N / 2]: two signed 4-bit values a byte,
column 2j in the low nibble and 2j + 1 in the high one, the packing of MindSpore's own Ascend test
of the op (tests/st/ops/ascend/test_weight_quant_int4.py); its inference doubles the last
dimension back to N. A QuantWeight's unsigned codes c with center z = 2^(bits-1) become the signed
values c - z; 2-bit codes (BitCPM's ternary weights) fit int4 exactly.
- symmetric, w = s (c - z): offset zeros. Exact when the scales are stored in the compute dtype
  (quantize-on-load on Ascend stores them so); other scales are rounded to it.
- asymmetric, w = s c + m (GGUF Q4_1, GPTQ zero points): offset o = (s z + m) / s', s' the scale
  in the compute dtype, so that (c - z + o) s' = s' (c - z) + (s z + m): w when s' = s, up to
  rounding o to the compute dtype. s z + m is the group's weight at code z, inside the group's
  range, so that rounding costs at most half an ulp of the group's largest |w|: no worse than
  keeping the dequantized weight in the compute dtype. A group with s = 0 and m != 0, or whose o
  overflows fp16, has no such offset: refused.
The device rounds the sum and the product to the compute dtype as well (MindSpore's per-channel
int4 golden dequantizes so, in fp16 arithmetic), each again within half an ulp of the group's |w|.

Unverified on hardware (no NPU here): tests/ops/test_ascend_vendor_checks.py compiles these calls
through MindSpore's own inference in fp16 and bf16, and tests/ops/test_ascend_quant.py runs them
through the stand-in of tests/ascend_moe_standins.py, which reproduces MindSpore's int4 golden.
The kernel is a module-level name so that tests can replace it."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.ops.auto_generate import weight_quant_batch_matmul

GROUP_MULTIPLE = 32
MAX_DIM = 65535  # K and N


def check_ascend_layout(bits: int, n: int, k: int, group: int, name: str = "weight") -> None:
    """QuantError (one line naming `name`) for a layout WeightQuantBatchMatmul does not take."""
    from ..quant.formats import QuantError
    where = f"{name}: WeightQuantBatchMatmul on Ascend"
    if group != k and group % GROUP_MULTIPLE:
        raise QuantError(f"{where} takes groups of a multiple of {GROUP_MULTIPLE} inputs, not {group}")
    if max(n, k) > MAX_DIM:
        raise QuantError(f"{where} takes at most {MAX_DIM} inputs and outputs, not [{n}, {k}] "
                         "(a large vocabulary's LM head must stay unquantized there)")
    if bits < 8 and n % 2:
        raise QuantError(f"{where} packs int4 weights in pairs of outputs; {n} outputs is odd")


def ascend_tensors(qw, dtype, name: str = "weight") -> tuple[Tensor, Tensor, Tensor]:
    """(weight int8 [K, N] or qint4x2 [K, N / 2], antiquant_scale, antiquant_offset) of a QuantWeight,
    its K in the QuantWeight's input order (a GPTQ act-order weight's: Linear gathers x into it)."""
    from ..quant.formats import stored_values
    n, k = qw.shape
    check_ascend_layout(qw.bits, n, k, qw.group_size, name)
    center = 1 << (qw.bits - 1)
    signed = (qw.codes().astype(np.int16) - center).astype(np.int8).T  # [K, N]
    scale = stored_values(qw.scales, qw.scale_dtype)  # [N, K / G]
    device_scale = Tensor(np.ascontiguousarray(scale.T), dtype)
    if qw.offsets is None:
        offset = np.zeros_like(scale)
    else:
        offset = _asymmetric_offset(scale, stored_values(qw.offsets, qw.scale_dtype), center,
                                    device_scale.astype(ms.float32).asnumpy().T, dtype, name)
    offset = Tensor(np.ascontiguousarray(offset.T), dtype)
    if qw.group_size == k:
        device_scale, offset = device_scale.reshape(n), offset.reshape(n)
    return _device_weight(signed, qw.bits), device_scale, offset


def _device_weight(signed: np.ndarray, bits: int) -> Tensor:
    if bits == 8:
        return Tensor(np.ascontiguousarray(signed))
    nibbles = signed.astype(np.uint8) & np.uint8(0xF)
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << np.uint8(4))
    return Tensor(np.ascontiguousarray(packed).view(np.int8), ms.qint4x2)


def _asymmetric_offset(scale, minimum, center, device_scale, dtype, name) -> np.ndarray:
    """o with (c - center + o) s' = s c + m (see the module docstring); all arrays [N, K / G]."""
    from ..quant.formats import QuantError
    at_center = scale * center + minimum
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(at_center == 0, 0.0, at_center / device_scale).astype(np.float32)
    limit = np.finfo(np.float16).max if dtype == ms.float16 else np.finfo(np.float32).max
    bad = ~(np.abs(offset) <= limit)
    if bad.any():
        row, group = np.argwhere(bad)[0]
        raise QuantError(f"{name}: group {group} of output {row} (scale {scale[row, group]:g}, minimum "
                         f"{minimum[row, group]:g}) has no antiquant offset in {dtype} for WeightQuantBatchMatmul")
    return offset


def ascend_parameter_shapes(n: int, k: int, group: int, bits: int) -> dict:
    """Name -> (shape, MindSpore dtype or None for the compute dtype) of a quantized layer's Parameters."""
    check_ascend_layout(bits, n, k, group)
    side = (n,) if group == k else (k // group, n)
    weight = ((k, n), ms.int8) if bits == 8 else ((k, n // 2), ms.qint4x2)
    return {"weight_packed": weight, "weight_scales": (side, None), "weight_offsets": (side, None)}


class AscendQuantMatmul(nn.Cell):
    """epilogue(x W^T) for x [..., K] with W as WeightQuantBatchMatmul's (weight, scale, offset);
    "swiglu": silu(gate) * up of a gate|up projection."""

    def __init__(self, epilogue: str):
        super().__init__()
        if epilogue not in ("plain", "swiglu"):
            raise ValueError(f"the Ascend quantized linear has no {epilogue!r} epilogue")
        self.swiglu = epilogue == "swiglu"

    def construct(self, x, weight, scale, offset):
        rows = x.reshape(-1, x.shape[-1])
        # shapes are constants when traced: the group and N come from the scale's [N] or [K / G, N]
        group = 0 if len(scale.shape) == 1 else rows.shape[-1] // scale.shape[0]
        y = weight_quant_batch_matmul(rows, weight, scale, offset, None, None, None, False, False, group)
        y = y.reshape(x.shape[:-1] + (scale.shape[-1],))
        if self.swiglu:
            gate, up = ops.split(y, y.shape[-1] // 2, -1)
            return ops.silu(gate) * up
        return y
