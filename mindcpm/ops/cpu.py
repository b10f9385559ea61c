"""The model's per-layer ops as C++ CPU kernels (kernels_aclnn/<op>/cpu.cc), one custom op each.

MindSpore has no fused CPU ops for these layers and its MatMul is slow for the thin matrices of
decode. In a compiled graph each op costs ~2 us to launch (and each Parameter ~2.5 us a call,
measured here), but each op also writes its output to memory and hands its work to the kernel
threads once, so the kernels take whole blocks: a MiniCPM decoder layer is two ops
(KernelDecoderLayer, put in place of the built layer by Device.fuse_blocks), the attention block
(KernelAttentionBlock: norm, q|k|v, RoPE + cache write + paged attention, o_proj, residual) and
the MLP block (KernelSwigluMlp: norm, gate|up, SwiGLU, down, residual). The single ops (KernelMatmul with its
epilogues and optional norm, KernelAttention, KernelRMSNorm, KernelEmbedding) serve the other
layers. Weights may be fp32, bf16 or fp16 (widened in registers); activations and the KV cache
are fp32. Each single op has a native twin in ops/native.py with the same construct signature,
which is the fallback and what the tests compare against.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from .cpu_kernels import aot_op
from .native import NativeMatmul


def _rows_by(width_fn):
    """out_shape of an op mapping x [..., K] to [..., width_fn(shapes)]."""
    return lambda x, *rest: list(x[:-1]) + [width_fn(x, *rest)]


def _fp32(*_):
    return ms.float32


class KernelMatmul(nn.Cell):
    """y = epilogue(x W^T) for x [..., K] fp32; epilogue "plain", "swiglu" (W = gate|up) or
    "residual" (y = r + scale * x W^T). With norm_eps (plain and swiglu), x is RMS-normalised
    with the norm weight construct receives, in the same kernel: one op fewer per norm.

    The kernel streams W once per block of rows of x: the right tool for decode. From
    GEMM_ROWS rows on (prefill), MindSpore's blocked MatMul is faster for fp32 weights
    (measured here: 512 x 1024 x 4096, 120 vs 220 ms), so the graph of such a shape uses it;
    16-bit weights always take the kernel (MindSpore has no bf16 CPU MatMul)."""

    GEMM_ROWS = 64

    @staticmethod
    def takes_matmul(x, weight) -> bool:
        """Whether x W^T goes to MindSpore's MatMul (known when the graph compiles)."""
        rows = 1
        for n in x.shape[:-1]:
            rows *= n
        return rows >= KernelMatmul.GEMM_ROWS and weight.dtype == ms.float32

    def __init__(self, epilogue: str = "plain", scale: float = 1.0, norm_eps: float | None = None):
        super().__init__()
        self.native = NativeMatmul(epilogue, scale)
        self.epilogue = epilogue
        self.norm = None if norm_eps is None else KernelRMSNorm(norm_eps)
        if self.norm is not None:
            if epilogue == "residual":
                raise ValueError("a norm before a residual projection is not fused")
            name, width = ("RmsNormLinear", lambda x, g, e, w: w[0]) if epilogue == "plain" else \
                ("RmsNormLinearSwiglu", lambda x, g, e, w: w[0] // 2)
            self.op = aot_op("linear", name, _rows_by(width), _fp32)
        elif epilogue == "plain":
            self.op = aot_op("linear", "Linear", _rows_by(lambda x, w: w[0]), _fp32)
        elif epilogue == "swiglu":
            self.op = aot_op("linear", "LinearSwiglu", _rows_by(lambda x, w: w[0] // 2), _fp32)
        elif epilogue == "residual":
            self.op = aot_op("linear", "LinearResidual", _rows_by(lambda x, w, r, s: w[0]), _fp32)
            self.scale = Tensor(np.array([scale], np.float32))
        else:
            raise ValueError(f"unknown linear epilogue {epilogue!r}")

    def construct(self, x, weight, residual=None, norm_weight=None):
        if KernelMatmul.takes_matmul(x, weight):
            if self.norm is not None:
                x = self.norm(x, norm_weight)
            return self.native(x, weight, residual)
        if self.norm is not None:
            return self.op(x, norm_weight, self.norm.eps, weight)
        if self.epilogue == "residual":
            return self.op(x, weight, residual, self.scale)
        return self.op(x, weight)


class KernelAttentionBlock(nn.Cell):
    """r + scale * o_proj(attention(qkv_proj(rmsnorm(x)))) in one kernel, built from the layer's
    own kernel cells (the q|k|v projection with its norm, the attention, o_proj with its
    residual): the attention block of a decoder layer is one op instead of three. Rows from
    GEMM_ROWS on with fp32 weights (prefill) run those three cells, whose projections use MatMul."""

    def __init__(self, qkv: KernelMatmul, attend: KernelAttention, o_proj: KernelMatmul):
        super().__init__()
        self.qkv, self.attend, self.o_proj = qkv, attend, o_proj
        self.op = aot_op("paged_attention", "RmsNormAttentionBlock", lambda x, *rest: x, _fp32)

    def construct(self, x, norm_weight, qkv_weight, k_cache, v_cache, positions, slot_mapping, block_tables,
                  block_size, o_weight, residual):
        if KernelMatmul.takes_matmul(x, qkv_weight):
            qkv = self.qkv(x, qkv_weight, None, norm_weight)
            out = self.attend(qkv, k_cache, v_cache, positions, slot_mapping, block_tables, block_size)
            return self.o_proj(out, o_weight, residual)
        rotary = self.attend.rotary
        return self.op(x, norm_weight, self.qkv.norm.eps, qkv_weight, rotary.cos, rotary.sin, positions,
                       slot_mapping, block_tables, k_cache, v_cache, self.attend.meta(block_size), o_weight,
                       residual, self.o_proj.scale)


class KernelSwigluMlp(nn.Cell):
    """r + scale * down(silu(gate) * up) of rmsnorm(x) in one kernel, built from the layer's own
    kernel cells (gate|up with its norm, down with its residual): the MLP block of a decoder layer
    is one op instead of two. Rows from GEMM_ROWS on with fp32 weights (prefill) run the two cells."""

    def __init__(self, gate_up: KernelMatmul, down: KernelMatmul):
        super().__init__()
        self.gate_up, self.down = gate_up, down
        self.op = aot_op("linear", "RmsNormSwigluMlp", lambda x, *rest: x, _fp32)

    def construct(self, x, norm_weight, gate_up_weight, down_weight, residual):
        if KernelMatmul.takes_matmul(x, gate_up_weight):
            return self.down(self.gate_up(x, gate_up_weight, None, norm_weight), down_weight, residual)
        return self.op(x, norm_weight, self.gate_up.norm.eps, gate_up_weight, down_weight, residual, self.down.scale)


class KernelRMSNorm(nn.Cell):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = Tensor(np.array([eps], np.float32))
        self.op = aot_op("rms_norm", "RmsNorm", lambda x, w, e: x, _fp32)

    def construct(self, x, weight):
        return self.op(x, weight, self.eps)


class KernelEmbedding(nn.Cell):
    """table[ids] * scale in fp32, for fp32 and 16-bit tables."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = Tensor(np.array([scale], np.float32))
        self.op = aot_op("embedding", "Embedding", lambda ids, t, s: list(ids) + [t[1]], _fp32)

    def construct(self, ids, table):
        return self.op(ids, table, self.scale)


class KernelAttention(nn.Cell):
    """qkv [B, L, (Hq + 2 Hkv) D] -> RoPE, K/V written into the caches in place, causal paged
    attention -> [B, L, Hq D]. Same contract as native.SplitRopeAttention."""

    def __init__(self, rotary, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.rotary = rotary
        self.op = aot_op("paged_attention", "RopePagedAttention",
                         lambda qkv, *rest: list(qkv[:-1]) + [num_heads * head_dim], _fp32)
        self.scale = scale

    def meta(self, block_size):
        """The kernel's [scale, block size] input (a constant of the graph)."""
        return Tensor([self.scale, float(block_size)], ms.float32)

    def construct(self, qkv, k_cache, v_cache, positions, slot_mapping, block_tables, block_size, *lengths):
        """lengths: the step's batch_valid_length and q_seq_lens, which the positions imply here."""
        return self.op(qkv, self.rotary.cos, self.rotary.sin, positions, slot_mapping, block_tables,
                       k_cache, v_cache, self.meta(block_size))


class KernelDecoderLayer(nn.Cell):
    """A built pre-norm decoder layer, h += s * attn(norm(h)); h += s * mlp(norm(h)), as two kernel
    ops (KernelAttentionBlock, KernelSwigluMlp). It keeps the layer's own cells under their own
    names, so its Parameters and their checkpoint names are the layer's (Device.fuse_blocks).

    lazy_inline: the compiled decode step parses one layer's graph and reuses it for every layer
    before inlining them ("front"), instead of parsing each layer again (measured: the decode
    graph of the default 30-layer model compiles in 4 s instead of 11 s; same tokens, same
    decode speed)."""

    @ms.lazy_inline(policy="front")
    def __init__(self, layer):
        super().__init__()
        self.input_layernorm, self.self_attn = layer.input_layernorm, layer.self_attn
        self.post_attention_layernorm, self.mlp = layer.post_attention_layernorm, layer.mlp
        scale = layer.residual_scale
        self.attention_block = KernelAttentionBlock(KernelMatmul("plain", norm_eps=layer.input_layernorm.eps),
                                                    layer.self_attn.attend, KernelMatmul("residual", scale))
        self.mlp_block = KernelSwigluMlp(KernelMatmul("swiglu", norm_eps=layer.post_attention_layernorm.eps),
                                         KernelMatmul("residual", scale))

    def construct(self, h, positions, slot_mapping, block_tables, block_size, *extra):
        attn, mlp = self.self_attn, self.mlp
        h = self.attention_block(h, self.input_layernorm.weight, attn.qkv_proj.weight, attn.k_cache, attn.v_cache,
                                 positions, slot_mapping, block_tables, block_size, attn.o_proj.weight, h)
        return self.mlp_block(h, self.post_attention_layernorm.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight, h)
