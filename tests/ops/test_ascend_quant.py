"""The Ascend quantized linear (mindcpm/ops/ascend_quant.py: WeightQuantBatchMatmul, W8A16 and
W4A16) through the stand-in written from its documentation (tests/ascend_moe_standins.py), against
numpy written here from the math: round-to-nearest quantization, x @ the dequantized weight.
The stand-in itself is held to MindSpore's own int4 golden first (test_standin_reproduces_...).
Op by op (PyNative): on CPU, MindSpore 2.10 reads an int4 tensor's bytes only outside a graph."""
from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")

from tests.ascend_moe_standins import STANDINS, weight_quant_batch_matmul_standin  # noqa: E402
from tests.ascend_standins import verify  # noqa: E402

TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}  # the stand-in rounds the fp32 product to x's dtype once


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """values rounded to fp16 / bf16 (torch's rounding), back in fp32."""
    return torch.from_numpy(np.asarray(values, np.float32)).to(getattr(torch, dtype)).float().numpy()


def rtn_symmetric(w: np.ndarray, bits: int, group: int, scale_dtype: str) -> np.ndarray:
    """The weight symmetric round-to-nearest stands for: s = max|w| / (2^(bits-1) - 1) per group,
    stored in scale_dtype, values round(w / s) clipped to the signed range."""
    n, k = w.shape
    top = 2 ** (bits - 1) - 1
    g = w.reshape(n, k // group, group)
    s = round_to(np.abs(g).max(-1, keepdims=True) / top, scale_dtype)
    return (s * np.clip(np.round(g / s), -top - 1, top)).reshape(n, k)


@pytest.fixture
def standin(monkeypatch):
    import mindcpm.ops.ascend_quant as ascend_quant
    from mindcpm.ops import setup_runtime
    setup_runtime("cpu")
    verify({"WeightQuantBatchMatmul": STANDINS["WeightQuantBatchMatmul"]})
    monkeypatch.setattr(ascend_quant, "weight_quant_batch_matmul", weight_quant_batch_matmul_standin)


def run_linear(device, w: np.ndarray, x: np.ndarray, epilogue: str = "plain") -> np.ndarray:
    from mindcpm.layers.linear import Linear
    n, k = w.shape
    layer = Linear(k, [n // 2, n // 2] if epilogue == "swiglu" else n, device.dtype, epilogue, device=device)
    layer.quant.load_float(w)
    return layer(ms.Tensor(x, device.dtype)).astype(ms.float32).asnumpy()


def swiglu(y: np.ndarray) -> np.ndarray:
    gate, up = np.split(y, 2, -1)
    return gate / (1 + np.exp(-gate)) * up


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("method,group,epilogue", [
    ("int8", None, "plain"), ("int8", 32, "swiglu"), ("int4", 32, "plain"), ("int4", 128, "swiglu"),
    ("int4", None, "plain")])
def test_quantized_linear_on_ascend_matches_numpy(standin, dtype, method, group, epilogue):
    if epilogue == "swiglu" and dtype == "bfloat16":
        pytest.skip("MindSpore's CPU Sigmoid has no bf16 kernel (the SwiGLU after the matmul; Ascend has one)")
    from mindcpm.ops import Device
    rng = np.random.default_rng(0)
    k, n = 256, 48
    device = Device("ascend", getattr(ms, dtype), quantization=method, quant_group_size=group or k)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
    x = round_to(rng.standard_normal((3, 5, k)), dtype)
    got = run_linear(device, w, x, epilogue)
    # on Ascend the scales are stored in the compute dtype (WeightQuantBatchMatmul's)
    want = x @ rtn_symmetric(w, int(method[3:]), group or k, dtype).T
    if epilogue == "swiglu":
        want = swiglu(want)
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * np.abs(want).max())


def test_int8_groups_with_an_odd_number_of_outputs(standin):
    from mindcpm.ops import Device
    rng = np.random.default_rng(1)
    k, n = 64, 47
    device = Device("ascend", ms.float16, quantization="int8", quant_group_size=32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = round_to(rng.standard_normal((4, k)), "float16")
    want = x @ rtn_symmetric(w, 8, 32, "float16").T
    np.testing.assert_allclose(run_linear(device, w, x), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("bits,symmetric", [(4, False), (2, True), (8, False)])
def test_quant_weights_reach_ascend_as_their_dequantized_values(standin, dtype, bits, symmetric):
    """A QuantWeight (asymmetric like GGUF's Q4_1, 2-bit like BitCPM's, fp16 scales as GGUF's)
    through the Ascend layout: the weight WeightQuantBatchMatmul dequantizes, (q + offset) * scale,
    is s c + m up to half an ulp of the group's largest |w| in the compute dtype, and the product
    matches x @ the QuantWeight's dequantized weight, written here from its codes."""
    from mindcpm.ops import Device
    from mindcpm.ops.ascend_quant import AscendQuantMatmul
    from mindcpm.quant.formats import stored_values
    from mindcpm.quant.rtn import quantize
    rng = np.random.default_rng(2)
    n, k, group = 32, 128, 32
    w = rng.standard_normal((n, k)).astype(np.float32) + rng.uniform(-1, 1, (n, 1)).astype(np.float32)
    qw = quantize(w, bits, group, symmetric=symmetric, scale_dtype="float16")
    codes = qw.codes().reshape(n, k // group, group).astype(np.float32)
    s = stored_values(qw.scales, "float16")[:, :, None]
    exact = s * (codes if not symmetric else codes - 2 ** (bits - 1))
    if not symmetric:
        exact = exact + stored_values(qw.offsets, "float16")[:, :, None]
    device = Device("ascend", getattr(ms, dtype))
    weight, scale, offset = device.quant_tensors(qw)
    signed = weight.asnumpy()
    if bits < 8:  # qint4x2 bytes: column 2j in the low nibble, 2j + 1 in the high one
        assert weight.dtype == ms.qint4x2 and signed.shape == (k, n // 2)
        signed = np.stack([(signed << 4) >> 4, signed >> 4], -1).reshape(k, n)
    per_row = [np.repeat(t.astype(ms.float32).asnumpy(), group, 0) for t in (scale, offset)]
    device_w = ((signed + per_row[1]) * per_row[0]).T.reshape(n, k // group, group)
    ulp = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}[dtype]
    bound = np.abs(exact).max(-1, keepdims=True) * ulp
    assert np.all(np.abs(device_w - exact) <= bound * 1.0001 + 1e-12)
    x = round_to(rng.standard_normal((5, k)), dtype)
    got = AscendQuantMatmul("plain")(ms.Tensor(x, getattr(ms, dtype)), weight, scale, offset)
    want = x @ exact.reshape(n, k).T
    tol = TOL[dtype] * 2  # the bf16/fp16 offsets' rounding, on top of the output's
    np.testing.assert_allclose(got.astype(ms.float32).asnumpy(), want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_run_on_ascend_like_gguf_py_dequantizes_them(standin, type_name):
    """A GGUF checkpoint's own blocks (group 32, fp16 scales; Q4_1 asymmetric) loaded into an
    Ascend layer sized at build as a per-channel int8 placeholder: the Parameters are replaced by
    the blocks' layout and the group size is read off them; against gguf-py's dequantize."""
    gguf = pytest.importorskip("gguf")
    from mindcpm.layers.linear import Linear
    from mindcpm.ops import Device
    from mindcpm.quant import gguf_blocks
    rng = np.random.default_rng(4)
    n, k = 10, 96
    kind = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), kind)
    layer = Linear(k, n, ms.float16, device=Device("ascend", ms.float16, quantization="gguf"))
    layer.quant.load_quantized(gguf_blocks.from_gguf(raw, type_name, (n, k)))
    x = round_to(rng.standard_normal((3, k)), "float16")
    want = x @ gguf.quants.dequantize(raw, kind).reshape(n, k).T
    got = layer(ms.Tensor(x, ms.float16)).astype(ms.float32).asnumpy()
    tol = TOL["float16"] * 2  # Q4_1's offsets rounded to fp16, on top of the output's rounding
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("bits,sym", [(4, False), (8, True)])
def test_gptq_act_order_runs_on_ascend_through_the_same_gather(standin, bits, sym):
    """A GPTQ act-order layer (g_idx a shuffled assignment to groups) on Ascend: Linear gathers x
    into the weight's group order before WeightQuantBatchMatmul; against x @ the weight the GPTQ
    tensors stand for in the layer's own input order (tests/quant/test_formats.py's gptq_layer)."""
    from mindcpm.layers.linear import Linear
    from mindcpm.ops import Device
    from mindcpm.quant import gptq
    from tests.quant.test_formats import gptq_layer
    rng = np.random.default_rng(5)
    n, k = 16, 128
    *tensors, w = gptq_layer(rng, n, k, bits, 32, sym, True, "gptq")
    config = gptq.check_config({"bits": bits, "group_size": 32, "sym": sym, "desc_act": True})
    layer = Linear(k, n, ms.float16, device=Device("ascend", ms.float16, quantization="gptq"))
    layer.quant.load_quantized(gptq.from_gptq(*tensors, config, "q_proj"))
    assert layer.input_perm is not None
    x = round_to(rng.standard_normal((3, k)), "float16")
    want = x @ w.T
    got = layer(ms.Tensor(x, ms.float16)).astype(ms.float32).asnumpy()
    tol = TOL["float16"] * 2  # asymmetric offsets rounded to fp16, on top of the output's rounding
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_standin_reproduces_mindspores_int4_per_group_golden():
    """MindSpore's own Ascend ST test of the op with int4 and antiquant_group_size
    (tests/st/ops/ascend/test_weight_quant_int4.py in the mindspore-ai/mindspore_test mirror; the
    op's 2.10 docstring has no example): 4 rows, K = 256, N = 128, four groups of 64; the weight is a
    linspace over [-0.64, 0.64] quantized against random fp16 scale and offset (w / s + o, clipped
    to [-8, 7], truncated), packed two a byte with the even column in the low nibble, and the
    expected output is x @ ((q + offset) * scale) in fp32, within a relative 3e-3. Data drawn
    here with our own seed, the recipe as there."""
    rng = np.random.default_rng(666)
    m, k, n, group = 4, 256, 128, 64
    x = rng.random((m, k)).astype(np.float16)
    scale = rng.random((k // group, n)).astype(np.float16)
    offset = rng.random((k // group, n)).astype(np.float16)
    w = np.linspace(-0.64, 0.64, k * n).astype(np.float16).reshape(k, n)
    rows = np.repeat(np.arange(k // group), group)
    q = np.clip(w / scale[rows] + offset[rows], -8, 7).astype(np.int8)
    packed = (q[:, 0::2] & 0xF) | (q[:, 1::2] << 4)
    expect = x.astype(np.float32) @ ((q + offset[rows].astype(np.float32)) * scale[rows].astype(np.float32))
    got = weight_quant_batch_matmul_standin(ms.Tensor(x), ms.Tensor(packed.astype(np.int8), ms.qint4x2),
                                            ms.Tensor(scale), ms.Tensor(offset), antiquant_group_size=group)
    np.testing.assert_allclose(got.astype(ms.float32).asnumpy(), expect, rtol=3e-3)


def test_standin_reproduces_mindspores_int4_per_channel_golden():
    """The per-channel case of the same MindSpore test: 8 x 8, the linspace weight quantized as
    round(w / s + o) clipped to [-8, 7] against random fp16 scale and offset per output column,
    the op given antiquant_offset = -o, the expected output x @ fp16(s (q - o)), relative 1e-3."""
    rng = np.random.default_rng(666)
    x = rng.random((8, 8)).astype(np.float16)
    w = np.linspace(-0.64, 0.64, 64).astype(np.float16).reshape(8, 8)
    scale, offset = rng.random(8).astype(np.float16), rng.random(8).astype(np.float16)
    q = np.clip(np.round(w / scale + offset), -8, 7).astype(np.int8)
    packed = (q[:, 0::2] & 0xF) | (q[:, 1::2] << 4)
    expect = x.astype(np.float32) @ (scale * (q - offset)).astype(np.float16).astype(np.float32)
    got = weight_quant_batch_matmul_standin(ms.Tensor(x), ms.Tensor(packed.astype(np.int8), ms.qint4x2),
                                            ms.Tensor(scale), ms.Tensor(-offset))
    np.testing.assert_allclose(got.astype(ms.float32).asnumpy(), expect, rtol=1e-3)


def test_layouts_ascend_does_not_take_are_one_line():
    from mindcpm.layers.linear import Linear
    from mindcpm.ops import Device
    from mindcpm.ops.ascend_quant import check_ascend_layout
    from mindcpm.quant.formats import QuantError
    with pytest.raises(QuantError, match=r"^weight: WeightQuantBatchMatmul on Ascend takes groups of a multiple "
                                         r"of 32 inputs, not 16$"):
        Linear(64, 48, ms.float16, device=Device("ascend", ms.float16, quantization="int8", quant_group_size=16))
    with pytest.raises(QuantError, match="packs int4 weights in pairs of outputs; 47 outputs is odd"):
        Linear(64, 47, ms.float16, device=Device("ascend", ms.float16, quantization="int4", quant_group_size=32))
    with pytest.raises(QuantError, match="at most 65535 inputs and outputs, not \\[73448, 1024\\]"):
        check_ascend_layout(8, 73448, 1024, 1024, "lm_head")


def test_a_vocabulary_wider_than_the_op_keeps_the_head_float_on_ascend():
    """MiniCPM4's 73448-word head exceeds WeightQuantBatchMatmul's N limit: on Ascend an int8/int4
    model keeps that head float (and still builds) instead of refusing; a narrower head and the
    CPU quantize it."""
    from mindcpm.layers.embedding import LMHead
    from mindcpm.ops import Device
    ascend = Device("ascend", ms.float16, quantization="int8")
    assert not ascend.quantizes_head(73448) and ascend.quantizes_head(32000)
    assert Device(kernels=True, quantization="int8").quantizes_head(73448)
    head = LMHead(73448, 64, None, ms.float16, device=ascend)
    assert not head.quant_head and tuple(head.weight.shape) == (73448, 64)


def test_an_asymmetric_group_without_an_offset_is_refused():
    """s = 0 with m != 0 (a constant group) has no (q + o) * s form: one line naming it."""
    from mindcpm.ops.ascend_quant import ascend_tensors
    from mindcpm.quant.formats import QuantError
    from mindcpm.quant.rtn import quantize
    w = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    w[2, 32:] = 0.5
    qw = quantize(w, 4, 32, symmetric=False, scale_dtype="float16")
    with pytest.raises(QuantError, match=r"^q_proj: group 1 of output 2 \(scale 0, minimum 0.5\) has no antiquant "
                                         r"offset in Float16 for WeightQuantBatchMatmul$"):
        ascend_tensors(qw, ms.float16, "q_proj")
