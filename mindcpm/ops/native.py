"""Attention over the paged KV cache with ops that run on every device (CPU and Ascend).

The cache of one layer is slot-major, (num_slots, kv_heads, head_dim): writing it with
scatter_update on axis 0 is the form that stays correct under MindSpore's dynamic shapes
(docs/mindspore_cpu.md#dynamic-shapes-and-cache-layout), and a block is block_size consecutive slots.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

# Finite, so that a padding query whose keys are all masked gets a harmless uniform softmax
# instead of NaN.
MASKED = -1e30


class NativeAttention(nn.Cell):
    def __init__(self):
        super().__init__()
        self.scores = ops.BatchMatMul(transpose_b=True)
        self.weighted = ops.BatchMatMul()

    def construct(self, q, k, v, k_cache, v_cache, positions, slot_mapping, block_tables, block_size, scale,
                  batch_valid_length=None, q_seq_lens=None):
        """q: [B, L, Hq, D]; k, v: [B, L, Hkv, D]; positions: [B, L] (-1 for padding);
        slot_mapping: [B*L]; block_tables: [B, nb]. Returns [B, L, Hq*D]. The row lengths are
        the kernels' inputs (ops/ascend.py); the positions say the same here."""
        b, l, hq, d = q.shape
        hkv = k.shape[2]
        ops.scatter_update(k_cache, slot_mapping, k.reshape(b * l, hkv, d))
        ops.scatter_update(v_cache, slot_mapping, v.reshape(b * l, hkv, d))
        slots = gather_slots(block_tables, block_size)  # [B, S]
        s = slots.shape[1]
        keys = ops.gather(k_cache, slots.reshape(-1), 0).reshape(b, s, hkv, d).transpose(0, 2, 1, 3)
        values = ops.gather(v_cache, slots.reshape(-1), 0).reshape(b, s, hkv, d).transpose(0, 2, 1, 3)
        group = hq // hkv
        # Query heads h*group .. h*group+group-1 share KV head h: fold the group into the rows.
        queries = q.reshape(b, l, hkv, group, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, group * l, d)
        scores = self.scores(queries.astype(ms.float32), keys.astype(ms.float32)) * scale
        scores = scores.reshape(b, hkv, group, l, s)
        key_pos = ops.arange(s, dtype=ms.int32).reshape(1, 1, s)
        visible = (key_pos <= positions.reshape(b, l, 1)).reshape(b, 1, 1, l, s)
        scores = ops.where(visible, scores, MASKED)
        probs = ops.softmax(scores, -1).reshape(b, hkv, group * l, s)
        out = self.weighted(probs, values.astype(ms.float32))  # [B, Hkv, G*L, D]
        out = out.reshape(b, hkv, group, l, d).transpose(0, 3, 1, 2, 4).reshape(b, l, hq * d)
        return out.astype(q.dtype)


def gather_slots(block_tables, block_size: int):
    """Cache slots of every position a block table covers: [B, nb] -> [B, nb*block_size]."""
    b, nb = block_tables.shape
    offsets = ops.arange(block_size, dtype=ms.int32).reshape(1, 1, block_size)
    return (block_tables.reshape(b, nb, 1) * block_size + offsets).reshape(b, nb * block_size)


class SplitRopeAttention(nn.Cell):
    """qkv [B, L, (Hq + 2 Hkv) D] -> split into q, k, v, RoPE on q and k, then the device
    backend (native or Ascend) over the paged cache -> [B, L, Hq D]."""

    def __init__(self, backend: nn.Cell, rotary, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.backend, self.rotary = backend, rotary
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale = scale

    def construct(self, qkv, k_cache, v_cache, positions, slot_mapping, block_tables, block_size, *extra):
        """extra: batch_valid_length, q_seq_lens, then step inputs only some backends take
        (sparse attention's C1/C2 metadata)."""
        b, l, _ = qkv.shape
        q = qkv[..., : self.q_size].reshape(b, l, self.num_heads, self.head_dim)
        k = qkv[..., self.q_size: self.q_size + self.kv_size].reshape(b, l, self.num_kv_heads, self.head_dim)
        v = qkv[..., self.q_size + self.kv_size:].reshape(b, l, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return self.backend(q, k, v, k_cache, v_cache, positions, slot_mapping, block_tables, block_size,
                            self.scale, *extra)


class NativeMatmul(nn.Cell):
    """y = epilogue(x W^T), x [..., K]: "plain", "swiglu" (W = gate|up: silu(gate) * up) or
    "residual" (y = r + scale * x W^T). With norm_eps, x is first RMS-normalised with the
    norm weight construct receives (the norm that feeds this projection)."""

    def __init__(self, epilogue: str = "plain", scale: float = 1.0, norm_eps: float | None = None):
        super().__init__()
        if epilogue not in ("plain", "swiglu", "residual"):
            raise ValueError(f"unknown linear epilogue {epilogue!r}")
        self.epilogue, self.scale = epilogue, scale
        self.matmul = ops.MatMul(transpose_b=True)
        self.norm = None if norm_eps is None else NativeRMSNorm(norm_eps)

    def construct(self, x, weight, residual=None, norm_weight=None):
        if self.norm is not None:
            x = self.norm(x, norm_weight)
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]), weight)
        y = y.reshape(shape[:-1] + (y.shape[-1],))
        if self.epilogue == "swiglu":
            half = y.shape[-1] // 2
            return ops.silu(y[..., :half]) * y[..., half:]
        if self.epilogue == "residual":
            return residual + y * self.scale
        return y


class NativeRMSNorm(nn.Cell):
    """Variance in fp32; the weight multiplies after the cast back to the input dtype (docs/minicpm4.md#rmsnorm-precision)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def construct(self, x, weight):
        x32 = x.astype(ms.float32)
        variance = ops.mean(x32 * x32, -1, keep_dims=True)
        return (x32 * ops.rsqrt(variance + self.eps)).astype(x.dtype) * weight


class NativeEmbedding(nn.Cell):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def construct(self, ids, table):
        # gather, not nn.Embedding: the latter's op has no CPU kernel.
        return ops.gather(table, ids, 0) * self.scale


class NativeArgmax(nn.Cell):
    """Each row's arg-max over the last axis as int32 (ties: the lowest index)."""

    def construct(self, x):
        return ops.argmax(x, dim=-1).astype(ms.int32)
