"""Attention front-end: fused qkv projection, the device's attention core (RoPE and attention
over the paged cache), o_proj."""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from ..ops import attention_block, attention_core
from ..parallel import head_shards
from .linear import Linear
from .rotary import RotaryEmbedding


class PagedAttention(nn.Cell):
    """With a residual_scale, construct(..., r) returns r + residual_scale * o_proj(attention).
    With an input_norm, x is the un-normalised input and qkv_proj applies the norm (see Linear);
    with both, the device may run the whole block as one op (ops.attention_block).

    Tensor parallel: each rank keeps its query heads and the KV heads they read (cache_shape is
    the rank's), qkv_proj column-parallel and o_proj row-parallel."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rotary: RotaryEmbedding, backend: nn.Cell, cache_shape: tuple, dtype=ms.float32,
                 residual_scale: float | None = None, input_norm=None):
        super().__init__()
        q_heads, kv_heads = head_shards(num_heads, num_kv_heads)
        rows = [slice(h.start * head_dim, h.stop * head_dim) for h in (q_heads, kv_heads, kv_heads)]
        self.num_heads, self.num_kv_heads = q_heads.stop - q_heads.start, kv_heads.stop - kv_heads.start
        self.head_dim = head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.qkv_proj = Linear(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                               dtype, parallel="column", part_shards=rows, input_norm=input_norm)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, dtype,
                             "plain" if residual_scale is None else "residual", residual_scale or 1.0,
                             parallel="row")
        self.attend = attention_core(backend, rotary, self.num_heads, self.num_kv_heads, head_dim, self.scale)
        self.fused = attention_block(self.qkv_proj.matmul, self.attend, self.o_proj.matmul)
        self.k_cache = Parameter(Tensor(np.zeros(cache_shape), dtype), name="k_cache", requires_grad=False)
        self.v_cache = Parameter(Tensor(np.zeros(cache_shape), dtype), name="v_cache", requires_grad=False)

    def construct(self, x, positions, slot_mapping, block_tables, block_size, residual=None, *extra):
        """extra: step inputs only some backends take (sparse attention's C1/C2 metadata)."""
        if self.fused is not None:
            return self.fused(x, self.qkv_proj.input_norm.weight, self.qkv_proj.weight, self.k_cache, self.v_cache,
                              positions, slot_mapping, block_tables, block_size, self.o_proj.weight, residual)
        out = self.attend(self.qkv_proj(x), self.k_cache, self.v_cache, positions, slot_mapping, block_tables,
                          block_size, *extra)
        return self.o_proj(out, residual)
