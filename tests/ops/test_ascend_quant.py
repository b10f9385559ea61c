"""The Ascend quantized linear (mindcpm/ops/ascend_quant.py: WeightQuantBatchMatmul, W8A16)
through the stand-in written from its documentation (tests/ascend_moe_standins.py), against
numpy: round-to-nearest int8 written here from the math, x @ the dequantized weight."""
from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from tests.ascend_moe_standins import STANDINS  # noqa: E402
from tests.ascend_standins import verify  # noqa: E402


def rtn_int8(w: np.ndarray, group: int) -> np.ndarray:
    """The weight symmetric int8 with fp16 scales stands for: s = max|w| / 127 per group."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    s = (np.abs(g).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    return (s * np.clip(np.round(g / s), -127, 127)).reshape(n, k)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("epilogue", ["plain", "swiglu"])
def test_weight_quant_batch_matmul_linear_matches_numpy(monkeypatch, dtype, group, epilogue):
    if epilogue == "swiglu" and dtype == "bfloat16":
        pytest.skip("MindSpore's CPU Sigmoid has no bf16 kernel (the SwiGLU after the matmul; Ascend has one)")
    import mindcpm.ops.ascend_quant as ascend_quant
    from mindcpm.layers.linear import Linear
    from mindcpm.ops import Device, setup_runtime
    setup_runtime("cpu")
    verify({"WeightQuantBatchMatmul": STANDINS["WeightQuantBatchMatmul"]})
    monkeypatch.setattr(ascend_quant, "WeightQuantBatchMatmul", STANDINS["WeightQuantBatchMatmul"])
    rng = np.random.default_rng(0)
    k, n = 64, 48
    device = Device("ascend", getattr(ms, dtype), quantization="int8", quant_group_size=group)
    layer = Linear(k, [n // 2, n // 2] if epilogue == "swiglu" else n, getattr(ms, dtype), epilogue, device=device)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
    layer.quant.load_float(w)
    assert layer.weight_packed.dtype == ms.int8 and layer.weight_packed.shape == (k, n)
    x = rng.standard_normal((3, 5, k)).astype(np.float32)
    x16 = ms.Tensor(x, getattr(ms, dtype))
    got = layer(x16).astype(ms.float32).asnumpy()
    want = x16.astype(ms.float32).asnumpy() @ rtn_int8(w, group or k).T
    if epilogue == "swiglu":
        gate, up = want[..., : n // 2], want[..., n // 2:]
        want = gate / (1 + np.exp(-gate)) * up
    # the stand-in rounds the fp32 product to fp16 / bf16 once (and the SwiGLU's operands too)
    tol = {"float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_int4_on_ascend_is_one_line():
    from mindcpm.ops import Device
    with pytest.raises(ValueError, match="quantization 'int4' is not wired on Ascend yet"):
        Device("ascend", ms.float16, quantization="int4")
