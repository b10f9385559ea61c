"""Attention front-end: fused qkv projection, the device's attention core (RoPE and attention
over the paged cache), o_proj."""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from ..ops import attention_core
from .linear import Linear
from .rotary import RotaryEmbedding


class PagedAttention(nn.Cell):
    """With a residual_scale, construct(..., r) returns r + residual_scale * o_proj(attention)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rotary: RotaryEmbedding, backend: nn.Cell, cache_shape: tuple, dtype=ms.float32,
                 residual_scale: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.qkv_proj = Linear(hidden_size, [self.q_size, self.kv_size, self.kv_size], dtype)
        self.o_proj = Linear(self.q_size, hidden_size, dtype,
                             "plain" if residual_scale is None else "residual", residual_scale or 1.0)
        self.attend = attention_core(backend, rotary, num_heads, num_kv_heads, head_dim, self.scale)
        self.k_cache = Parameter(Tensor(np.zeros(cache_shape), dtype), name="k_cache", requires_grad=False)
        self.v_cache = Parameter(Tensor(np.zeros(cache_shape), dtype), name="v_cache", requires_grad=False)

    def construct(self, x, positions, slot_mapping, block_tables, block_size, residual=None):
        out = self.attend(self.qkv_proj(x), self.k_cache, self.v_cache, positions, slot_mapping, block_tables,
                          block_size)
        return self.o_proj(out, residual)
