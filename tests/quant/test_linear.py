"""The quantized linear kernel (kernels_aclnn/quant_linear/cpu.cc) against numpy written from the
format: random codes, scales and offsets made here, packed here byte by byte from the layout,
y = x W^T in float64 with W dequantized here. Every instruction set this CPU runs (scalar, AVX2,
AVX-512, AVX-512 VNNI) on odd sizes: groups not a multiple of the vector width, N odd, 1 and many
rows. test_emulated_isas.py runs the AVX-512 ones here on CPUs without them."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import Tensor  # noqa: E402

from mindcpm.ops import cpu_kernels  # noqa: E402
from tests.quant.rounding import x_rounding_bound  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_kernels.kernels_available(), reason="no g++ to build the CPU kernels")

ISAS = ["scalar", "avx2", "avx512", "avx512vnni"]
MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def runnable_isas():
    from mindcpm.quant import linear
    isas = []
    for isa in ISAS:
        try:
            linear.set_kernel_isa(isa)
            isas.append(isa)
        except ValueError:
            pass
    linear.set_kernel_isa("auto")
    return isas


@pytest.fixture(params=ISAS)
def isa(request):
    from mindcpm.quant import linear
    if request.param not in runnable_isas():
        pytest.skip(f"this CPU has no {request.param}")
    linear.set_kernel_isa(request.param)
    yield request.param
    linear.set_kernel_isa("auto")


def pack_here(codes: np.ndarray, bits: int) -> np.ndarray:
    """The byte layout of kernels_aclnn/quant_linear/cpu.cc, one byte position at a time."""
    n, k = codes.shape
    if bits == 8:
        return codes.astype(np.uint8)
    per = 8 // bits
    step = 32 // per
    out = np.zeros((n, k * bits // 8), np.uint8)
    for b in range(k // 32):
        for j in range(step):
            byte = 0
            for i in range(per):
                byte = byte | (codes[:, 32 * b + j + i * step].astype(np.int64) << (i * bits))
            out[:, b * step + j] = byte
    return out


def make_weight(rng, n, k, bits, group, asym, dtype):
    """(kernel tensors, the exact fp32 weight they stand for, the magnitude of the terms the kernel
    sums: |s c| + |offset|, the offset being m, or s 2^(bits-1) when symmetric)."""
    groups = k // group
    codes = rng.integers(0, 1 << bits, (n, k))
    s_t = Tensor(rng.uniform(0.01, 0.2, (n, groups)).astype(np.float32), MS_DTYPES[dtype])
    s = s_t.astype(ms.float32).asnumpy().astype(np.float64)
    if asym:
        m_t = Tensor(rng.uniform(-1, 1, (n, groups)).astype(np.float32), MS_DTYPES[dtype])
        m = m_t.astype(ms.float32).asnumpy().astype(np.float64)
    else:
        m_t = Tensor(np.zeros(1, np.float32))
        m = -s * (1 << (bits - 1))
    s, m = np.repeat(s, group, 1), np.repeat(m, group, 1)
    return (Tensor(pack_here(codes, bits), ms.uint8), s_t, m_t), s * codes + m, np.abs(s * codes) + np.abs(m)


def assert_close(got, x, w, magnitude):
    """got == x W^T up to float32 accumulation: a few ulps of sum |x| (|s c| + |offset|), the
    terms the kernel adds (its order differs from numpy's, and the offset term cancels)."""
    want = x.astype(np.float64) @ w.T
    bound = np.abs(x.astype(np.float64)) @ magnitude.T
    assert np.all(np.abs(got - want) <= 1e-5 * bound + 1e-6), np.max(np.abs(got - want) / (bound + 1e-6))
    return want


# (bits, K, group): 8-bit per channel over odd K and groups of 20 / 40 (not a multiple of 16),
# 4-bit groups 32 / 64 / 128 with K not a multiple of 64, 2-bit groups of 32 and whole rows.
FORMATS = [(8, 1001, 1001), (8, 100, 20), (8, 120, 40), (4, 96, 32), (4, 192, 64), (4, 384, 128), (2, 96, 32),
           (2, 160, 160)]


@pytest.mark.parametrize("bits,k,group", FORMATS)
@pytest.mark.parametrize("m,n", [(1, 13), (1, 1001), (3, 7), (17, 9)])
def test_plain_matches_numpy(isa, bits, k, group, m, n):
    from mindcpm.quant.linear import KernelQuantMatmul
    rng = np.random.default_rng(bits * 7 + k + 31 * m + n)
    for asym, dtype in ((False, "float16"), (True, "bfloat16"), (bits == 8, "float32")):
        tensors, w, magnitude = make_weight(rng, n, k, bits, group, asym, dtype)
        x = rng.standard_normal((m, k)).astype(np.float32)
        assert_close(KernelQuantMatmul("plain")(Tensor(x), *tensors).asnumpy(), x, w, magnitude)


@pytest.mark.parametrize("bits,k,group", [(8, 1001, 1001), (4, 96, 32), (2, 160, 32)])
@pytest.mark.parametrize("m", [1, 5])
def test_swiglu_and_residual_epilogues(isa, bits, k, group, m):
    from mindcpm.quant.linear import KernelQuantMatmul
    rng = np.random.default_rng(bits + k + m)
    n = 11
    tensors, w, magnitude = make_weight(rng, 2 * n, k, bits, group, False, "float16")
    # Leading dims are rows; small inputs keep x W^T near 1, where SwiGLU is not flat.
    x = (rng.standard_normal((1, m, k)) / (np.sqrt(k) * (1 << (bits - 1)) * 0.1)).astype(np.float32)
    y = x.astype(np.float64) @ w.T
    gate, up = y[..., :n], y[..., n:]
    got = KernelQuantMatmul("swiglu")(Tensor(x), *tensors).asnumpy()
    np.testing.assert_allclose(got, gate / (1 + np.exp(-gate)) * up, rtol=1e-4, atol=1e-4)
    r = rng.standard_normal((1, m, 2 * n)).astype(np.float32)
    got = KernelQuantMatmul("residual", 0.37)(Tensor(x), *tensors, Tensor(r)).asnumpy()
    assert_close((got - r) / 0.37, x, w, magnitude)


@pytest.mark.parametrize("bits", [4, 8])
def test_prefill_with_a_short_last_block_of_rows(isa, bits):
    """Prefill walks x in blocks of rows that fit L2 (15 rows at K = 8192); a last block of fewer than
    4 rows takes the decode tile, with fp32 x."""
    from mindcpm.quant.linear import KernelQuantMatmul
    rng = np.random.default_rng(bits)
    tensors, w, magnitude = make_weight(rng, 5, 8192, bits, 32, True, "float16")
    x = rng.standard_normal((16, 8192)).astype(np.float32)
    assert_close(KernelQuantMatmul("plain")(Tensor(x), *tensors).asnumpy(), x, w, magnitude)


@pytest.mark.parametrize("epilogue", ["plain", "swiglu"])
def test_act_order_linear_gathers_x_into_the_weight_order(epilogue):
    """A GPTQ act-order weight (kernel input k = layer input perm[k]) in a Linear: W[:, k]
    multiplies x[:, perm[k]]; loaded again without the order, the layer drops it."""
    from mindcpm.layers.linear import Linear
    from mindcpm.ops.device import Device
    from mindcpm.quant.formats import QuantWeight
    rng = np.random.default_rng(5)
    n = 6
    tensors, w, magnitude = make_weight(rng, n, 64, 4, 32, False, "float32")
    perm = rng.permutation(64)
    layer = Linear(64, [n // 2, n // 2] if epilogue == "swiglu" else n, epilogue=epilogue,
                   device=Device(kernels=True, quantization="gptq"))
    x = rng.standard_normal((1, 3, 64)).astype(np.float32)

    def check(order):
        got = layer(Tensor(x)).asnumpy()[0]
        y = assert_close(got, x[0][:, order], w, magnitude) if epilogue == "plain" else x[0][:, order] @ w.T
        if epilogue == "swiglu":
            gate, up = y[:, :n // 2], y[:, n // 2:]
            np.testing.assert_allclose(got, gate / (1 + np.exp(-gate)) * up, rtol=1e-4,
                                       atol=1e-4 * np.abs(y).max() ** 2)  # as the norm-fused swiglu test

    qw = QuantWeight(tensors[0].asnumpy(), tensors[1].asnumpy(), None, 4, 32, "float32", perm)
    layer.quant.load_quantized(qw)
    np.testing.assert_array_equal(layer.input_perm.asnumpy(), perm)
    check(perm)
    layer.quant.load_quantized(QuantWeight(qw.packed, qw.scales, None, 4, 32, "float32"))
    assert layer.input_perm is None
    check(np.arange(64))


@pytest.mark.parametrize("packed,scales,offsets,match", [
    ((5, 40), (5, 3), (1,), "packed"),        # 40 bytes for K=96 is no bit width
    ((5, 48), (5, 5), (1,), "scales"),        # 5 groups do not divide K=96
    ((5, 48), (4, 3), (1,), "scales"),        # scales rows differ from packed rows
    ((5, 48), (5, 3), (5, 2), "offsets"),
    ((5, 24), (5, 6), (1,), "scales"),        # 2-bit groups of 16
])
def test_bad_shapes_name_the_argument(packed, scales, offsets, match):
    from mindcpm.quant.linear import KernelQuantMatmul
    x = Tensor(np.zeros((1, 96), np.float32))
    args = (Tensor(np.zeros(packed, np.uint8)), Tensor(np.ones(scales, np.float32)),
            Tensor(np.zeros(offsets, np.float32)))
    with pytest.raises(ValueError, match=match):
        KernelQuantMatmul("plain")(x, *args)


def test_emulation_reaches_the_build():
    """In test_emulated_isas.py's child process, MINDCPM_EMULATE_AVX512=1 survives conftest.py and
    reaches the kernel's compiler flags, so the AVX-512 tests there run on SIMDe's intrinsics."""
    if os.environ.get("MINDCPM_EMULATE_AVX512") != "1":
        pytest.skip("runs in test_emulated_isas.py's child process")
    assert "-DMINDCPM_EMULATE_AVX512" in cpu_kernels.compile_flags("quant_linear")


def test_environment_picks_the_instruction_set():
    code = "from mindcpm.quant.linear import kernel_isa; print(kernel_isa())"
    env = dict(os.environ, MINDCPM_QUANT_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "scalar"


class _QuantLayer(ms.nn.Cell):
    """A layer whose quantized weight is three Parameters, run through one jit graph (as in a model)."""

    def __init__(self, tensors, epilogue):
        from mindcpm.quant.linear import KernelQuantMatmul
        super().__init__()
        self.op = KernelQuantMatmul(epilogue, 0.5)
        self.packed, self.scales, self.offsets = (ms.Parameter(t, name=n, requires_grad=False)
                                                  for t, n in zip(tensors, ("packed", "scales", "offsets")))

    @ms.jit
    def construct(self, x, r):
        return self.op(x, self.packed, self.scales, self.offsets, r)


def test_jit_graph_with_parameters():
    rng = np.random.default_rng(8)
    tensors, w, magnitude = make_weight(rng, 9, 96, 4, 32, True, "bfloat16")
    layer = _QuantLayer(tensors, "residual")
    for m in (1, 6):  # a decode and a prefill shape, one graph each
        x = rng.standard_normal((1, m, 96)).astype(np.float32)
        r = rng.standard_normal((1, m, 9)).astype(np.float32)
        got = layer(Tensor(x), Tensor(r)).asnumpy()
        assert_close((got - r) / 0.5, x, w, magnitude)


@pytest.mark.parametrize("bits,k,group", [(8, 100, 20), (4, 96, 32)])
@pytest.mark.parametrize("m", [1, 7])
def test_norm_fused_into_the_projection(isa, bits, k, group, m):
    from mindcpm.quant.linear import KernelQuantMatmul
    rng = np.random.default_rng(bits + k + m)
    n = 5
    tensors, w, magnitude = make_weight(rng, 2 * n, k, bits, group, False, "float32")
    x = (3 * rng.standard_normal((m, k))).astype(np.float32)
    g = rng.uniform(0.5, 1.5, k).astype(np.float32)
    xn = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * g
    got = KernelQuantMatmul("plain", norm_eps=1e-5)(Tensor(x), *tensors, norm_weight=Tensor(g)).asnumpy()
    assert_close(got, xn, w, magnitude)
    small = KernelQuantMatmul("swiglu", norm_eps=1e-5)(Tensor(x), *tensors, norm_weight=Tensor(g)).asnumpy()
    y = xn @ w.T
    np.testing.assert_allclose(small, y[:, :n] / (1 + np.exp(-y[:, :n])) * y[:, n:], rtol=1e-4,
                               atol=1e-4 * np.abs(y).max() ** 2)


def test_bad_norm_weight_is_named():
    from mindcpm.quant.linear import KernelQuantMatmul
    rng = np.random.default_rng(0)
    tensors, _, _ = make_weight(rng, 4, 64, 4, 32, False, "float32")
    with pytest.raises(ValueError, match="norm weight \\[63\\] is not \\[64\\]"):
        KernelQuantMatmul("plain", norm_eps=1e-5)(Tensor(np.ones((1, 64), np.float32)), *tensors,
                                                  norm_weight=Tensor(np.ones(63, np.float32)))


@pytest.mark.parametrize("m", [1, 6])
def test_mlp_block_matches_numpy(isa, m):
    from mindcpm.quant.linear import KernelQuantSwigluMlp
    rng = np.random.default_rng(m)
    k, i = 96, 64
    gate_up, wgu, _ = make_weight(rng, 2 * i, k, 4, 32, True, "float16")  # each weight its own format
    down, wd, _ = make_weight(rng, k, i, 8, 16, False, "bfloat16")
    x = (3 * rng.standard_normal((1, m, k))).astype(np.float32)
    g = rng.uniform(0.5, 1.5, k).astype(np.float32)
    r = rng.standard_normal((1, m, k)).astype(np.float32)
    xn = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * g
    y = xn @ wgu.T
    hidden = y[..., :i] / (1 + np.exp(-y[..., :i])) * y[..., i:]
    want = r + 0.5 * hidden @ wd.T
    got = KernelQuantSwigluMlp(1e-5, 0.5)(Tensor(x), Tensor(g), *gate_up, *down, Tensor(r)).asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# (bits, K, group, asymmetric, scale dtype): int8 per channel, int8 grouped, Q8_0, Q4_0, Q4_1, int4 g128
# symmetric / asymmetric. K = 352 is 11 blocks: a span and a short one (3 blocks: GEMM), a lone last
# 4-bit block (decode); N = 37 leaves a last unit of 1 row (plain) and 2 rows (SwiGLU's 2 x 37 rows).
# VNNI's decode takes zmm steps of 128 inputs (4-bit) or 64 (8-bit) where K and the groups fit
# them, else ymm steps: the K = 352 / 160 cases take ymm; the last four take zmm with four (Q4_1)
# or two (int4 g64, Q8_0) groups a step and several steps a group (int8 per channel).
INT16_FORMATS = [(8, 352, 352, False, "float32"), (8, 384, 64, True, "bfloat16"), (8, 352, 32, False, "float16"),
                 (4, 352, 32, False, "float16"), (4, 160, 32, True, "float16"), (4, 384, 128, False, "bfloat16"),
                 (4, 384, 128, True, "float32"), (4, 512, 32, True, "float16"), (4, 256, 64, False, "bfloat16"),
                 (8, 384, 32, False, "float32"), (8, 384, 384, True, "float16")]


def int16_case(bits, k, group, asym, dtype, m, seed=0):
    """Tensors, dense weight, magnitude and x (with an outlier: its block rounds coarsely) of a case."""
    rng = np.random.default_rng(bits + k + group + m + seed)
    tensors, w, magnitude = make_weight(rng, 2 * 37, k, bits, group, asym, dtype)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, 40] *= 50
    return tensors, w, magnitude, x


def run_on(isa, epilogue, x, tensors, r=None):
    from mindcpm.quant import linear
    from mindcpm.quant.linear import KernelQuantMatmul
    linear.set_kernel_isa(isa)
    extra = () if r is None else (Tensor(r),)
    return KernelQuantMatmul(epilogue, 0.37)(Tensor(x), *tensors, *extra).asnumpy().astype(np.float64)


def within_int16_bound(got, want, x, w, magnitude):
    """|got - want| <= the documented rounding bound + two fp32 evaluations' slack (plain outputs)."""
    slack = 2e-5 * (np.abs(x.astype(np.float64)) @ magnitude.T) + 1e-6
    return np.abs(got - want) <= x_rounding_bound(x, w) + slack


@pytest.fixture
def simd_int16():
    """The SIMD paths this CPU runs, with the GEMM's int16 activations on; restored after."""
    from mindcpm.quant import linear
    simd = [isa for isa in runnable_isas() if isa != "scalar"]
    if not simd:
        pytest.skip("this CPU has no SIMD path")
    before = linear.gemm_activations()
    linear.set_gemm_activations("int16")
    yield simd
    linear.set_gemm_activations(before)
    linear.set_kernel_isa("auto")


@pytest.mark.parametrize("bits,k,group,asym,dtype", INT16_FORMATS)
@pytest.mark.parametrize("m", [1, 3, 4, 5, 7, 16, 17, 130])
def test_int16_activations_within_bound(simd_int16, bits, k, group, asym, dtype, m):
    """Decode (m < 4) and the int16 GEMM multiply the codes by x rounded to int16 per 32-input block:
    against the scalar path (fp32 x) each SIMD path may differ by the rounding bound
    (tests/quant/rounding.py) and no more, in every epilogue. For normal x that bound is below what
    rounding x to fp16 could cost; it holds with an outlier too."""
    tensors, w, magnitude, x = int16_case(bits, k, group, asym, dtype, m)
    normal = x.copy()
    normal[:, 40] /= 50
    assert np.all(x_rounding_bound(normal, w) < 2.0 ** -11 * (np.abs(normal.astype(np.float64)) @ np.abs(w).T))
    r = np.random.default_rng(m).standard_normal((m, 2 * 37)).astype(np.float32)
    # SwiGLU's gate and up rows: first-order error of silu(g) u, |silu'| <= 1.1
    bound = x_rounding_bound(x, w) + 2e-5 * (np.abs(x.astype(np.float64)) @ magnitude.T) + 1e-6
    y = x.astype(np.float64) @ w.T
    gate, up, bg, bu = y[:, :37], y[:, 37:], bound[:, :37], bound[:, 37:]
    swiglu_bound = 1.1 * bg * (np.abs(up) + bu) + np.abs(gate) * bu + 1e-4 * np.abs(gate * up) + 1e-4
    want = {e: run_on("scalar", e, x, tensors, r if e == "residual" else None) for e in ("plain", "swiglu", "residual")}
    for isa in simd_int16:
        got = run_on(isa, "plain", x, tensors)
        assert np.all(within_int16_bound(got, want["plain"], x, w, magnitude)), isa
        got = run_on(isa, "swiglu", x, tensors)
        assert np.all(np.abs(got - want["swiglu"]) <= swiglu_bound), isa
        got = run_on(isa, "residual", x, tensors, r)
        assert np.all(np.abs(got - want["residual"]) <= 0.37 * bound + 1e-6 * np.abs(r)), isa


@pytest.mark.parametrize("bits,k,group,asym,dtype", [INT16_FORMATS[0], INT16_FORMATS[3], INT16_FORMATS[4]])
@pytest.mark.parametrize("m", [1, 17])
def test_int16_bound_catches_a_flipped_code_and_a_wrong_scale(simd_int16, bits, k, group, asym, dtype, m):
    """The same tolerance is tight enough to see a weight that is wrong by one code's top bit (at x's
    largest input) or by one group's scale off by 5%: the bound does not hide such errors."""
    tensors, w, magnitude, x = int16_case(bits, k, group, asym, dtype, m, seed=1)
    want = run_on("scalar", "plain", x, tensors)
    packed, scales, offsets = (t.asnumpy() for t in tensors)
    col = int(np.argmax(np.abs(x).max(0)))
    flipped = packed.copy()
    byte = col if bits == 8 else (col // 32) * 16 + col % 16
    flipped[:, byte] ^= 0x80 if bits == 8 else (0x80 if col % 32 >= 16 else 0x08)
    wrong = scales.astype(np.float32).copy()
    wrong[:, col // group] *= 1.05
    bad_weights = [(Tensor(flipped), *tensors[1:]),
                   (tensors[0], Tensor(wrong, MS_DTYPES[dtype]), tensors[2])]
    for isa in simd_int16:
        assert np.all(within_int16_bound(run_on(isa, "plain", x, tensors), want, x, w, magnitude))
        for bad in bad_weights:
            assert not np.all(within_int16_bound(run_on(isa, "plain", x, bad), want, x, w, magnitude)), isa


def test_argmax_rows_matches_numpy_with_ties_and_nans():
    from mindcpm.quant.linear import KernelArgmaxRows
    rng = np.random.default_rng(11)
    x = rng.integers(-3, 4, (6, 1001)).astype(np.float32)  # many ties for the largest value
    x[1] = -np.inf
    x[2, [7, 500]] = np.nan
    x[3, 1000] = 99.0
    got = KernelArgmaxRows()(Tensor(x)).asnumpy()
    assert got.dtype == np.int32 and got.shape == (6, 1)  # as a decode step's input_ids
    np.testing.assert_array_equal(got[:, 0], np.argmax(x, axis=-1))  # the first largest, or the first NaN


def _call_kernel(lib, name: str, *arrays) -> int:
    """Calls the kernel entry point `name` as MindSpore's aot runtime does, on numpy arrays."""
    n = len(arrays)
    shapes = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
    return getattr(lib, name)(n, (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays]),
                              (ctypes.c_int * n)(*[a.ndim for a in arrays]),
                              (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64))
                                                                     for s in shapes]),
                              (ctypes.c_char_p * n)(*[str(a.dtype).encode() for a in arrays]), None, None)


def test_head_that_returns_early_is_complete_after_the_wait():
    """With early returns allowed (a compiled step's run) the LM head's op returns at once and the
    arg-max op is queued behind it: ids read straight after the calls are not yet written (64
    rows against a 24000 x 1024 weight take milliseconds); after QuantLinearWait (the end of
    early_returns) both outputs are complete. The head reads its own copy of x."""
    from mindcpm.quant.linear import _library
    lib = _library()
    rng = np.random.default_rng(12)
    (packed, scales, offsets), w, magnitude = make_weight(rng, 24000, 1024, 8, 1024, False, "float16")
    packed, scales, offsets = packed.asnumpy(), scales.asnumpy(), offsets.asnumpy()
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    x_in = x.copy()
    logits = np.full((64, 24000), np.nan, np.float32)
    ids = np.full(64, -1, np.int32)
    lib.QuantLinearAllowEarlyReturns(1)
    try:
        assert _call_kernel(lib, "QuantLinearAsync", x_in, packed, scales, offsets, logits) == 0
        x_in[:] = 0  # MindSpore may hand x's memory to a later op's output once the op returned
        assert _call_kernel(lib, "ArgmaxRows", logits, ids) == 0
        unwritten = int((ids == -1).sum())
    finally:
        lib.QuantLinearAllowEarlyReturns(0)
        assert lib.QuantLinearWait() == 0
    threads = int(os.environ.get("MINDCPM_KERNEL_THREADS") or 0) or len(os.sched_getaffinity(0))
    if threads > 1:  # a pool without workers runs each task before its op returns
        assert unwritten == 64, "the ops did not return before their work was done"
    want = assert_close(logits, x, w, magnitude)
    np.testing.assert_array_equal(ids, np.argmax(logits, axis=-1))
    assert np.abs(want[np.arange(64), ids] - want.max(-1)).max() <= 1e-4 * np.abs(want).max()
