"""Weight-only int8 linears on Ascend (W8A16): aclnn WeightQuantBatchMatmul computes
x @ ((weight + antiquant_offset) * antiquant_scale) with weight int8 [K, N] (not transposed),
scale and offset [N] (per output channel, antiquant_group_size 0) or [K / G, N] (group size G),
in x's dtype (fp16 or bf16). A symmetric QuantWeight's codes c become weight = c - 128 and its
offset zeros, so the product is the same dequantized weight the CPU kernel uses.

Unverified on hardware (no NPU here): tests/ops/test_ascend_vendor_checks.py compiles the call
through MindSpore's own inference in fp16 and bf16, and tests/ops/test_ascend_quant.py runs it
through the stand-in of tests/ascend_moe_standins.py written from the documentation.
The kernel is a module-level name so that tests can replace it."""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.ops.auto_generate import WeightQuantBatchMatmul


def ascend_tensors(qw, dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(weight int8 [K, N], antiquant_scale, antiquant_offset) of a symmetric 8-bit QuantWeight."""
    from ..quant.formats import QuantError, stored_values
    if qw.bits != 8 or qw.offsets is not None or qw.input_perm is not None:
        raise QuantError("on Ascend only symmetric int8 weights (W8A16) are wired to WeightQuantBatchMatmul")
    n, k = qw.shape
    weight = (qw.codes().astype(np.int16) - 128).astype(np.int8).T
    scale = stored_values(qw.scales, qw.scale_dtype).T  # [K / G, N]
    if qw.group_size == k:
        scale = scale.reshape(n)
    return (Tensor(np.ascontiguousarray(weight)), Tensor(np.ascontiguousarray(scale), dtype),
            Tensor(np.zeros(scale.shape, np.float32), dtype))


def ascend_parameter_shapes(n: int, k: int, group: int) -> dict:
    """Name -> (shape, numpy dtype or None for the compute dtype) of a quantized layer's Parameters."""
    side = (n,) if group == k else (k // group, n)
    return {"weight_packed": ((k, n), np.int8), "weight_scales": (side, None), "weight_offsets": (side, None)}


class AscendQuantMatmul(nn.Cell):
    """epilogue(x W^T) for x [..., K] with W as WeightQuantBatchMatmul's (weight, scale, offset);
    "swiglu": silu(gate) * up of a gate|up projection."""

    def __init__(self, epilogue: str, group_size: int):
        super().__init__()
        if epilogue not in ("plain", "swiglu"):
            raise ValueError(f"the Ascend quantized linear has no {epilogue!r} epilogue")
        self.swiglu = epilogue == "swiglu"
        self.op = WeightQuantBatchMatmul(False, False, group_size)

    def construct(self, x, weight, scale, offset):
        rows = x.reshape(-1, x.shape[-1])
        y = self.op(rows, weight, scale, offset, None, None, None)
        y = y.reshape(x.shape[:-1] + (weight.shape[1],))
        if self.swiglu:
            gate, up = ops.split(y, y.shape[-1] // 2, -1)
            return ops.silu(gate) * up
        return y
