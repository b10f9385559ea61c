"""Attention front-end: fused qkv projection, RoPE, the device backend over the paged cache, o_proj."""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from .linear import Linear
from .rotary import RotaryEmbedding


class PagedAttention(nn.Cell):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rotary: RotaryEmbedding, backend: nn.Cell, cache_shape: tuple, dtype=ms.float32):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.qkv_proj = Linear(hidden_size, [self.q_size, self.kv_size, self.kv_size], dtype)
        self.o_proj = Linear(self.q_size, hidden_size, dtype)
        self.rotary = rotary
        self.backend = backend
        self.k_cache = Parameter(Tensor(np.zeros(cache_shape), dtype), name="k_cache", requires_grad=False)
        self.v_cache = Parameter(Tensor(np.zeros(cache_shape), dtype), name="v_cache", requires_grad=False)

    def construct(self, x, positions, slot_mapping, block_tables, block_size, *extra):
        """extra: step inputs only some backends take (sparse attention's C1/C2 metadata)."""
        b, l, _ = x.shape
        qkv = self.qkv_proj(x)
        q = qkv[..., : self.q_size].reshape(b, l, self.num_heads, self.head_dim)
        k = qkv[..., self.q_size: self.q_size + self.kv_size].reshape(b, l, self.num_kv_heads, self.head_dim)
        v = qkv[..., self.q_size + self.kv_size:].reshape(b, l, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = self.backend(q, k, v, self.k_cache, self.v_cache, positions, slot_mapping, block_tables,
                           block_size, self.scale, *extra)
        return self.o_proj(out)
