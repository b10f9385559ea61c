"""Attention front-end: fused qkv projection, the device's attention core (RoPE and attention
over the paged cache), o_proj."""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn

from ..ops.device import Device
from ..parallel import head_shards
from .linear import Linear
from .rotary import RotaryEmbedding
from .params import zeros_parameter


class PagedAttention(nn.Cell):
    """Tensor parallel: each rank keeps its query heads and the KV heads they read (the cache is
    the rank's), qkv_proj column-parallel and o_proj row-parallel."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rotary: RotaryEmbedding, device: Device, dtype=ms.float32, in_features: int | None = None):
        """in_features: the width qkv_proj reads, when not hidden_size (an EAGLE-3 head's [embedding, hidden])."""
        super().__init__()
        q_heads, kv_heads = head_shards(num_heads, num_kv_heads)
        rows = [slice(h.start * head_dim, h.stop * head_dim) for h in (q_heads, kv_heads, kv_heads)]
        self.num_heads, self.num_kv_heads = q_heads.stop - q_heads.start, kv_heads.stop - kv_heads.start
        self.head_dim = head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.qkv_proj = Linear(in_features or hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                               dtype, parallel="column", part_shards=rows, device=device)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, dtype, parallel="row", device=device)
        self.attend = device.attention(rotary, self.num_heads, self.num_kv_heads, head_dim, self.scale)
        cache_shape = device.cache_shape(self.num_kv_heads, head_dim)
        self.k_cache = zeros_parameter(cache_shape, dtype, "k_cache")
        self.v_cache = zeros_parameter(cache_shape, dtype, "v_cache")

    def construct(self, x, positions, slot_mapping, block_tables, block_size, *extra):
        """extra: the step's row lengths and the inputs only some attention cores take."""
        out = self.attend(self.qkv_proj(x), self.k_cache, self.v_cache, positions, slot_mapping, block_tables,
                          block_size, *extra)
        return self.o_proj(out)

