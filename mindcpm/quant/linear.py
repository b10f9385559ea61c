"""The quantized linear kernel (kernels_aclnn/quant_linear/cpu.cc) as a MindSpore cell.

    op = KernelQuantMatmul("plain")            # or "swiglu" (rows gate|up), "residual"
    packed, scales, offsets = kernel_tensors(qw)
    y = op(x, packed, scales, offsets)         # x [..., K] fp32 -> y [..., N] fp32
    y = KernelQuantMatmul("residual", 0.5)(x, packed, scales, offsets, r)   # r + 0.5 x W^T
    y = KernelQuantMatmul("swiglu", norm_eps=1e-5)(x, packed, scales, offsets, norm_weight=g)
                                               # the RMSNorm before the projection, in the same op

The same epilogues as ops/cpu.py KernelMatmul; the weight is three tensors instead of one.
x is in the weight's input order: a QuantWeight with input_perm (GPTQ act-order) gets x gathered
by it first (layers/linear.py's Linear does, on every device).

    mlp = KernelQuantSwigluMlp(norm_eps=1e-5, scale=1.0)     # a decoder layer's whole MLP block
    y = mlp(x, g, *kernel_tensors(gate_up), *kernel_tensors(down), r)   # r + down(swiglu(gate_up(rmsnorm x)))
"""
from __future__ import annotations

import contextlib
import ctypes
import functools

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from ..ops.cpu_kernels import aot_op, build
from .formats import QuantWeight, bf16_values

OP = "quant_linear"
ENTRY = {"plain": "QuantLinear", "swiglu": "QuantLinearSwiglu", "residual": "QuantLinearResidual"}
NORM_ENTRY = {"plain": "QuantRmsNormLinear", "swiglu": "QuantRmsNormLinearSwiglu"}
MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
ISAS = ("scalar", "avx2", "avx512", "avx512vnni")


def kernel_tensors(qw: QuantWeight) -> tuple[Tensor, Tensor, Tensor]:
    """(packed, scales, offsets) as the kernel takes them; offsets [1] when symmetric."""
    def stored(values: np.ndarray) -> Tensor:
        if qw.scale_dtype == "bfloat16":  # exact: the values are bfloat16 already
            return Tensor(bf16_values(values), ms.bfloat16)
        return Tensor(values, MS_DTYPES[qw.scale_dtype])
    offsets = Tensor(np.zeros(1, np.float32)) if qw.offsets is None else stored(qw.offsets)
    return Tensor(qw.packed, ms.uint8), stored(qw.scales), offsets


def _check_shapes(epilogue: str, x, *inputs) -> list:
    """The output shape; ValueError naming the argument that does not fit. Inputs after x:
    packed, scales, offsets (+ residual, scale); "norm <epilogue>": g, eps first."""
    k = x[-1]
    if epilogue.startswith("norm "):
        g, _, *inputs = inputs
        if list(g) != [k]:
            raise ValueError(f"quant linear: norm weight {list(g)} is not [{k}]")
        epilogue = epilogue[len("norm "):]
    packed, scales, offsets, *rest = inputs
    if len(packed) != 2 or k <= 0 or (packed[1] * 8) % k or (packed[1] * 8 // k) not in (8, 4, 2):
        raise ValueError(f"quant linear: packed {list(packed)} is not [N, K * bits / 8] for K={k}, bits 8/4/2")
    bits = packed[1] * 8 // k
    if len(scales) != 2 or scales[0] != packed[0] or k % scales[1] or (bits < 8 and (k // scales[1]) % 32):
        raise ValueError(f"quant linear: scales {list(scales)} is not [N, K / group] for N={packed[0]}, K={k}")
    if list(offsets) != [1] and list(offsets) != list(scales):
        raise ValueError(f"quant linear: offsets {list(offsets)} is neither [1] nor the scales' {list(scales)}")
    n = packed[0] // 2 if epilogue == "swiglu" else packed[0]
    if epilogue == "residual" and list(rest[0]) != list(x[:-1]) + [n]:
        raise ValueError(f"quant linear: residual {list(rest[0])} is not {list(x[:-1]) + [n]}")
    return list(x[:-1]) + [n]


def _element(dtype):
    """The element type of a dtype MindSpore passes to out_dtype (Tensor[Float32] -> Float32)."""
    return dtype.element_type() if hasattr(dtype, "element_type") else dtype


def _check_dtypes(epilogue: str, x, *inputs):
    """float32 (TypeError naming the argument that is not right); inputs as in _check_shapes."""
    if epilogue.startswith("norm "):
        inputs = inputs[2:]
    x, packed, scales = (_element(d) for d in (x, *inputs[:2]))
    if x != ms.float32 or packed != ms.uint8:
        raise TypeError(f"quant linear: x must be float32 and packed uint8, not {x} and {packed}")
    if scales not in (ms.float32, ms.float16, ms.bfloat16):
        raise TypeError(f"quant linear: scales must be float32, float16 or bfloat16, not {scales}")
    return ms.float32


class KernelQuantMatmul(nn.Cell):
    """y = epilogue(x W^T) with W kept quantized (see mindcpm/quant/formats.py)."""

    def __init__(self, epilogue: str = "plain", scale: float = 1.0, norm_eps: float | None = None,
                 returns_early: bool = False):
        super().__init__()
        if epilogue not in ENTRY:
            raise ValueError(f"unknown linear epilogue {epilogue!r}; choose {', '.join(ENTRY)}")
        if returns_early and (epilogue != "plain" or norm_eps is not None):
            raise ValueError("only a plain projection returns early")
        self.epilogue = epilogue
        self.returns_early = returns_early
        # returns_early (the LM head): inside a compiled step the op returns before its work is
        # done, and the step's run waits for it at its end (early_returns).
        self.op = aot_op(OP, "QuantLinearAsync" if returns_early else ENTRY[epilogue],
                         functools.partial(_check_shapes, epilogue), functools.partial(_check_dtypes, epilogue))
        self.scale = Tensor(np.array([scale], np.float32))
        self.eps = None if norm_eps is None else Tensor(np.array([norm_eps], np.float32))
        if norm_eps is not None:
            if epilogue not in NORM_ENTRY:
                raise ValueError("a norm before a residual projection is not fused")
            self.norm_op = aot_op(OP, NORM_ENTRY[epilogue], functools.partial(_check_shapes, "norm " + epilogue),
                                  functools.partial(_check_dtypes, "norm " + epilogue))

    def construct(self, x, packed, scales, offsets, residual=None, norm_weight=None):
        if self.eps is not None:
            return self.norm_op(x, norm_weight, self.eps, packed, scales, offsets)
        if self.epilogue == "residual":
            return self.op(x, packed, scales, offsets, residual, self.scale)
        return self.op(x, packed, scales, offsets)


def _mlp_shape(x, g, eps, gu_packed, gu_scales, gu_offsets, d_packed, d_scales, d_offsets, r, scale):
    hidden = _check_shapes("norm swiglu", x, g, eps, gu_packed, gu_scales, gu_offsets)
    return _check_shapes("residual", hidden, d_packed, d_scales, d_offsets, r, scale)


def _mlp_dtype(x, g, eps, gu_packed, gu_scales, gu_offsets, d_packed, d_scales, d_offsets, r, scale):
    _check_dtypes("plain", x, d_packed, d_scales)
    return _check_dtypes("norm swiglu", x, g, eps, gu_packed, gu_scales)


class KernelQuantSwigluMlp(nn.Cell):
    """r + scale * down(silu(gate) * up) of rmsnorm(x) in one kernel, the weights kept quantized
    (each in its own format): a decoder layer's MLP block is one op, like ops/cpu.py's
    KernelSwigluMlp. Weights with an input_perm (GPTQ act-order) take the separate ops instead
    (Device.fuse_blocks leaves their layers unfused)."""

    def __init__(self, norm_eps: float, scale: float = 1.0):
        super().__init__()
        self.eps = Tensor(np.array([norm_eps], np.float32))
        self.scale = Tensor(np.array([scale], np.float32))
        self.op = aot_op(OP, "QuantRmsNormSwigluMlp", _mlp_shape, _mlp_dtype)

    def construct(self, x, norm_weight, gu_packed, gu_scales, gu_offsets, d_packed, d_scales, d_offsets, residual):
        return self.op(x, norm_weight, self.eps, gu_packed, gu_scales, gu_offsets, d_packed, d_scales, d_offsets,
                       residual, self.scale)


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(build(OP))  # the same file MindSpore loads, so the same process-wide choice
    lib.QuantLinearIsa.restype = ctypes.c_char_p
    lib.QuantLinearSetIsa.argtypes = [ctypes.c_char_p]
    lib.QuantLinearGemm.restype = ctypes.c_char_p
    lib.QuantLinearSetGemm.argtypes = [ctypes.c_char_p]
    lib.QuantLinearAllowEarlyReturns.argtypes = [ctypes.c_int]
    return lib


@contextlib.contextmanager
def early_returns(wait: bool = True):
    """Within: fused layers and LM heads built with returns_early return before their work is
    done; on leaving, waits until it is (unless not `wait`: then the next compiled step's
    embedding, or wait_for_kernels, does). Only around a compiled graph's run: an op run on its
    own may see its inputs freed as it returns."""
    lib = _library()
    lib.QuantLinearAllowEarlyReturns(1)
    try:
        yield
    finally:
        lib.QuantLinearAllowEarlyReturns(0)
    if wait:
        wait_for_kernels()


def wait_for_kernels() -> None:
    """Waits for the kernels' ops that returned early; RuntimeError if one failed."""
    err = _library().QuantLinearWait()
    if err:
        raise RuntimeError(f"a quantized layer's kernel failed with error code {err} (kernels_aclnn/quant_linear)")


class KernelArgmaxRows(nn.Cell):
    """ids [M, 1] int32 = the first index of each row's largest value of x [M, N] fp32 (a NaN
    counts as the largest, as numpy's): shaped as a decode step's input_ids. Behind an LM head
    that returned early it is queued after the head and returns early too."""

    def __init__(self):
        super().__init__()
        self.op = aot_op(OP, "ArgmaxRows", _argmax_shape, lambda x: ms.int32)

    def construct(self, x):
        return self.op(x)


def _argmax_shape(x) -> list:
    if len(x) != 2:
        raise ValueError(f"argmax rows: x {list(x)} is not [M, N]")
    return [x[0], 1]


def kernel_isa() -> str:
    """The instruction set the kernel runs ("scalar" | "avx2" | "avx512" | "avx512vnni"); the
    environment variable MINDCPM_QUANT_ISA picks a narrower one at start-up."""
    return _library().QuantLinearIsa().decode()


def set_kernel_isa(name: str) -> None:
    """Runs the kernel with instruction set `name` ("auto": the best this CPU has) from now on."""
    if _library().QuantLinearSetIsa(name.encode()) != 0:
        raise ValueError(f"instruction set {name!r} is unknown or this CPU lacks it (choose from "
                         f"auto, {', '.join(ISAS)})")


def gemm_activations() -> str:
    """What the kernel's GEMM (4+ rows of x) multiplies 4- and 8-bit codes by on AVX2/AVX-512: "int16"
    (the default: x rounded per 32 inputs as decode does, within the documented bound, faster) or
    "fp32" (x as it is); MINDCPM_QUANT_GEMM=fp32 picks fp32 at start-up."""
    return _library().QuantLinearGemm().decode()


def set_gemm_activations(name: str) -> None:
    """Runs the kernel's GEMM with activations `name` ("fp32" | "int16") from now on."""
    if _library().QuantLinearSetGemm(name.encode()) != 0:
        raise ValueError(f"unknown GEMM activations {name!r}; choose fp32 or int16")


def _block_shape(x, g, eps, qkv_packed, qkv_scales, qkv_offsets, cos, sin, positions, slot_mapping, block_tables,
                 k_cache, v_cache, meta, o_packed, o_scales, o_offsets, r, scale):
    qkv = _check_shapes("norm plain", x, g, eps, qkv_packed, qkv_scales, qkv_offsets)
    kv_width = 2 * k_cache[-2] * k_cache[-1]
    attended = list(qkv[:-1]) + [qkv[-1] - kv_width]
    return _check_shapes("residual", attended, o_packed, o_scales, o_offsets, r, scale)


def _block_dtype(x, g, eps, qkv_packed, qkv_scales, qkv_offsets, *rest):
    o_packed, o_scales = rest[8], rest[9]
    _check_dtypes("plain", x, o_packed, o_scales)
    return _check_dtypes("norm plain", x, g, eps, qkv_packed, qkv_scales)


def _layer_shape(x, g1, eps1, qkv_packed, qkv_scales, qkv_offsets, cos, sin, positions, slot_mapping, block_tables,
                 k_cache, v_cache, meta, o_packed, o_scales, o_offsets, scale, g2, eps2, *mlp_weights):
    attended = _block_shape(x, g1, eps1, qkv_packed, qkv_scales, qkv_offsets, cos, sin, positions, slot_mapping,
                            block_tables, k_cache, v_cache, meta, o_packed, o_scales, o_offsets, x, scale)
    return _mlp_shape(attended, g2, eps2, *mlp_weights, attended, scale)


def _layer_dtype(x, g1, eps1, qkv_packed, qkv_scales, qkv_offsets, cos, sin, positions, slot_mapping, block_tables,
                 k_cache, v_cache, meta, o_packed, o_scales, o_offsets, scale, g2, eps2, *mlp_weights):
    _block_dtype(x, g1, eps1, qkv_packed, qkv_scales, qkv_offsets, cos, sin, positions, slot_mapping, block_tables,
                 k_cache, v_cache, meta, o_packed, o_scales, o_offsets, x, scale)
    return _mlp_dtype(x, g2, eps2, *mlp_weights, x, scale)


class KernelQuantDecoderLayer(nn.Cell):
    """A built pre-norm decoder layer with quantized projections, as ops/cpu.py's
    KernelDecoderLayer is for float ones (Device.fuse_blocks), as one op: the attention block
    (norm, q|k|v, RoPE + cache write + paged attention, o_proj and its residual), then the MLP
    block (norm, gate|up, SwiGLU, down and its residual). Each op of a decode step costs
    MindSpore's runtime host time, more than a small GEMV. It keeps the layer's own cells under
    their names, so the Parameters and checkpoint names stay the layer's.

    With returns_early, the op returns before its work is done (Pool::launch in cpu_common.h)
    while a compiled step runs, and the next fused layer's op waits for it: MindSpore's host work
    between two ops then overlaps the layer. Only for a layer whose output the next fused layer alone reads
    (Device.fuse_blocks): MindSpore's own ops do not wait."""

    def __init__(self, layer, returns_early: bool = False):
        super().__init__()
        self.input_layernorm, self.self_attn = layer.input_layernorm, layer.self_attn
        self.post_attention_layernorm, self.mlp = layer.post_attention_layernorm, layer.mlp
        self.attend = layer.self_attn.attend
        self.eps = Tensor(np.array([layer.input_layernorm.eps], np.float32))
        self.post_eps = Tensor(np.array([layer.post_attention_layernorm.eps], np.float32))
        self.scale = Tensor(np.array([layer.residual_scale], np.float32))
        self.returns_early = returns_early
        entry = "QuantRmsNormDecoderLayerAsync" if returns_early else "QuantRmsNormDecoderLayer"
        self.op = aot_op(OP, entry, _layer_shape, _layer_dtype)

    def construct(self, h, positions, slot_mapping, block_tables, block_size, *extra):
        attn, qkv, o = self.self_attn, self.self_attn.qkv_proj, self.self_attn.o_proj
        gu, down = self.mlp.gate_up_proj, self.mlp.down_proj
        rotary = self.attend.rotary
        return self.op(h, self.input_layernorm.weight, self.eps, qkv.weight_packed, qkv.weight_scales,
                       qkv.weight_offsets, rotary.cos, rotary.sin, positions, slot_mapping, block_tables,
                       attn.k_cache, attn.v_cache, self.attend.meta(block_size), o.weight_packed, o.weight_scales,
                       o.weight_offsets, self.scale, self.post_attention_layernorm.weight, self.post_eps,
                       gu.weight_packed, gu.weight_scales, gu.weight_offsets, down.weight_packed, down.weight_scales,
                       down.weight_offsets)
