"""Attention over the paged KV cache with the Ascend fused kernels.

  write K/V   ReshapeAndCache      key/value as (B*L, Hkv*D): the op counts tokens as
                                   prod(key.shape[:-1]), so the docstring's (T, N, D) key would be
                                   taken for T*N tokens (mindspore_cpu_facts §3).
  decode      PagedAttention       L == 1 (a compile-time constant): query (B, Hq, D), the row's
                                   block table and context_lens = position + 1.
  prefill     FlashAttentionScore  L > 1, any chunk of any rows: BSH query (B, L, Hq*D) against the
                                   row's whole block table gathered from the cache (B, nb*bs, Hkv*D),
                                   with an explicit uint8 mask (B, 1, L, nb*bs), 1 = discard.

The cache of one layer is (num_blocks, block_size, kv_heads, head_dim), the layout both
ReshapeAndCache and PagedAttention document; slot s is [s // block_size, s % block_size].

Dtype contract: the three kernels take fp16/bf16 only (q, k, v and the caches in one dtype;
block tables, context lengths and slots int32; the mask uint8). The model on Ascend runs in
bf16/fp16 and the caches are created in the model's dtype, so nothing is cast here; an fp32
model runs only with the CPU stand-ins of tests/ascend_standins.py.

Padding tokens (position -1) attend to key 0 of their row (context length 1, or a mask row that
keeps key 0) instead of to nothing: what the kernels return for a query with no visible key is
not documented, and a NaN there would be written into the spare padding block that every
row's table padding points at. Their outputs are never read.

Unverified on hardware (no NPU was available): MindSpore's internal PagedAttention and
FlashAttentionScore kernels also read sequence lengths on the host from a graph input *named*
"batch_valid_length" (and "q_seq_lens"), which is how vLLM-MindSpore feeds them. Our compiled
step has no input of that name, so they must take context_lens from the device tensor passed here.
If decode is wrong on Ascend, look there first.

The kernels are module-level names so that tests can replace them
(tests/ascend_standins.py: install_standins).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops.auto_generate import FlashAttentionScore, PagedAttention, ReshapeAndCache


class AscendAttention(nn.Cell):
    name = "ascend"

    def __init__(self, num_heads: int | None = None, num_kv_heads: int | None = None,
                 scale: float | None = None):
        """The head counts and scale fix PagedAttention's and FlashAttentionScore's attributes.
        The model's backend factory calls this with no arguments; the two kernels are then
        created in construct from the (compile-time constant) shapes and scale, which graph
        mode allows for primitives and cells alike."""
        super().__init__()
        self.reshape_and_cache = ReshapeAndCache()
        self.paged_attention = None
        self.flash_attention = None
        self.num_heads, self.num_kv_heads, self.scale = num_heads, num_kv_heads, scale
        if num_heads is not None:
            if num_kv_heads is None or scale is None:
                raise ValueError("AscendAttention: give num_heads, num_kv_heads and scale together")
            self.paged_attention = PagedAttention(head_num=num_heads, scale_value=float(scale),
                                                  kv_head_num=num_kv_heads)
            self.flash_attention = FlashAttentionScore(head_num=num_heads, scale_value=float(scale),
                                                       input_layout="BSH", sparse_mode=0)

    @staticmethod
    def cache_shape(num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple:
        return (num_blocks, block_size, kv_heads, head_dim)

    def construct(self, q, k, v, k_cache, v_cache, positions, slot_mapping, block_tables, block_size, scale):
        """q: [B, L, Hq, D]; k, v: [B, L, Hkv, D]; positions: [B, L] (-1 for padding);
        slot_mapping: [B*L]; block_tables: [B, nb]. Returns [B, L, Hq*D]."""
        b, l, hq, d = q.shape
        hkv = k.shape[2]
        written = self.reshape_and_cache(k.reshape(b * l, hkv * d), v.reshape(b * l, hkv * d),
                                         k_cache, v_cache, slot_mapping.astype(ms.int32))
        # The attention below reads the caches: order it after the write.
        q = ops.depend(q, written)
        tables = block_tables.astype(ms.int32)
        positions = positions.astype(ms.int32)
        if l == 1:
            pa = self.paged_attention
            if pa is None:
                pa = PagedAttention(head_num=hq, scale_value=scale, kv_head_num=hkv)
            context_lens = ops.maximum(positions.reshape(b) + 1, 1)
            out = pa(q.reshape(b, hq, d), k_cache, v_cache, tables, context_lens)
            return out.reshape(b, 1, hq * d)
        fa = self.flash_attention
        if fa is None:
            fa = FlashAttentionScore(head_num=hq, scale_value=scale, input_layout="BSH", sparse_mode=0)
        nb = tables.shape[1]
        s = nb * block_size
        keys = ops.gather(k_cache, tables, 0).reshape(b, s, hkv * d)  # [B, nb, bs, Hkv, D] -> BSH
        values = ops.gather(v_cache, tables, 0).reshape(b, s, hkv * d)
        key_pos = ops.arange(s, dtype=ms.int32).reshape(1, 1, 1, s)
        query_pos = ops.maximum(positions, 0).reshape(b, 1, l, 1)
        mask = (key_pos > query_pos).astype(ms.uint8)  # [B, 1, L, S], 1 = discard
        out = fa(q.reshape(b, l, hq * d), keys, values, None, None, None, mask)[3]
        return out
