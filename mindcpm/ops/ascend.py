"""Attention over the paged KV cache with the Ascend fused kernels.

  write K/V   ReshapeAndCache      key/value as (B*L, Hkv*D): the op counts tokens as
                                   prod(key.shape[:-1]), so the docstring's (T, N, D) key would be
                                   taken for T*N tokens (docs/mindspore_cpu.md#ascend-fused-ops-on-cpu).
  decode      PagedAttention       L == 1 (a compile-time constant): query (B, Hq, D), the row's
                                   block table and its kv length, the step input batch_valid_length.
  prefill     FlashAttentionScore  L > 1, any chunk of any rows: BSH query (B, L, Hq*D) against the
                                   row's whole block table gathered from the cache (B, nb*bs, Hkv*D),
                                   with an explicit uint8 mask (B, 1, L, nb*bs), 1 = discard.

The cache of one layer is (num_blocks, block_size, kv_heads, head_dim), the layout both
ReshapeAndCache and PagedAttention document; slot s is [s // block_size, s % block_size].

Sequence lengths: with infer_boost on (ops/device.py), MindSpore's internal PagedAttention
kernel reads kv lengths on the host from the graph input named `batch_valid_length` and query
lengths from `q_seq_lens` (plugin/device/ascend/kernel/internal/paged_attention.cc), as
vllm-mindspore feeds them. The compiled step has inputs of exactly those names (device.py
STEP_INPUTS) and the same batch_valid_length tensor is PagedAttention's context_lens, so the
host and the device see one value.

Prefill kernel (a deliberate choice): aclnn FlashAttentionScore with the inputs it documents
(BSH, uint8 mask 1 = discard, sparse_mode 0). The internal FlashAttentionScore that infer_boost
could select instead takes additive fp16 masks and takes q lengths equal to kv lengths unless
told otherwise, which a chunked-prefill row contradicts; device.setup_runtime keeps it off with
MS_DISABLE_INTERNAL_KERNELS_LIST=FlashAttentionScore.

Dtype contract: the three kernels take fp16/bf16 only (q, k, v and the caches in one dtype;
block tables, kv lengths and slots int32; the mask uint8). The caches are created in the
model's dtype, so nothing is cast here.

Padding tokens (position -1) attend to key 0 of their row (kv length 1, or a mask row that
keeps key 0) instead of to nothing: what the kernels return for a query with no visible key is
not documented, and a NaN there would be written into the spare padding block that every
row's table padding points at. Their outputs are never read.

The kernels are module-level names so that tests can replace them
(tests/ascend_standins.py: install_standins).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops.auto_generate import FlashAttentionScore, PagedAttention, ReshapeAndCache


class AscendAttention(nn.Cell):
    def __init__(self, num_heads: int, num_kv_heads: int, scale: float):
        super().__init__()
        self.reshape_and_cache = ReshapeAndCache()
        self.paged_attention = PagedAttention(head_num=num_heads, scale_value=float(scale), kv_head_num=num_kv_heads)
        self.flash_attention = FlashAttentionScore(head_num=num_heads, scale_value=float(scale), input_layout="BSH",
                                                   sparse_mode=0)

    def construct(self, q, k, v, k_cache, v_cache, positions, slot_mapping, block_tables, block_size, scale,
                  batch_valid_length, q_seq_lens):
        """q: [B, L, Hq, D]; k, v: [B, L, Hkv, D]; positions: [B, L] (-1 for padding);
        slot_mapping: [B*L]; block_tables: [B, nb]; batch_valid_length, q_seq_lens: [B] int32,
        each row's kv length after this step and its number of new tokens (1 for padding rows).
        Returns [B, L, Hq*D]."""
        b, l, hq, d = q.shape
        hkv = k.shape[2]
        written = self.reshape_and_cache(k.reshape(b * l, hkv * d), v.reshape(b * l, hkv * d),
                                         k_cache, v_cache, slot_mapping)
        # The attention below reads the caches: order it after the write.
        q = ops.depend(q, written)
        if l == 1:
            out = self.paged_attention(q.reshape(b, hq, d), k_cache, v_cache, block_tables, batch_valid_length)
            return out.reshape(b, 1, hq * d)
        nb = block_tables.shape[1]
        s = nb * block_size
        keys = ops.gather(k_cache, block_tables, 0).reshape(b, s, hkv * d)  # [B, nb, bs, Hkv, D] -> BSH
        values = ops.gather(v_cache, block_tables, 0).reshape(b, s, hkv * d)
        key_pos = ops.arange(s, dtype=ms.int32).reshape(1, 1, 1, s)
        query_pos = ops.maximum(positions, 0).reshape(b, 1, l, 1)
        mask = (key_pos > query_pos).astype(ms.uint8)  # [B, 1, L, S], 1 = discard
        return self.flash_attention(q.reshape(b, l, hq * d), keys, values, None, None, None, mask)[3]
