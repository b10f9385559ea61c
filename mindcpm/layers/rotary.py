"""Rotary position embedding, plain or LongRoPE (docs/minicpm4.md#longrope), applied in fp32; optionally on the
first rotary_dim dims of each head only (MiniMax partial RoPE, docs/minimax.md#softmax-layers-and-partial-rope)."""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..config import RopeConfig


def rope_tables(rope: RopeConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables [positions served, rotary width] in fp32, computed in the order and
    precision of the reference implementations (fp32 throughout) so that angles match them bit for
    bit. Row p is the same whatever the table's length: only the model's window picks the factors."""
    d = rope.width
    inv_freq = (1.0 / (np.float32(rope.theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))).astype(np.float32)
    t = np.arange(rope.num_table_positions, dtype=np.float32)
    mscale = 1.0
    if rope.short_factor is None:
        freqs = np.outer(t, inv_freq)
    else:
        # The factor list is chosen once, for the whole table: long when the model's window
        # exceeds the original one. Both cos and sin carry the attention factor.
        use_long = rope.max_position > rope.original_max_position
        ext = np.asarray(rope.long_factor if use_long else rope.short_factor, dtype=np.float32)
        freqs = np.outer(t, (1.0 / ext).astype(np.float32)) * inv_freq
        scale = rope.max_position / rope.original_max_position
        mscale = math.sqrt(1 + math.log(scale) / math.log(rope.original_max_position))
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float32)
    return (np.cos(emb) * np.float32(mscale)).astype(np.float32), (np.sin(emb) * np.float32(mscale)).astype(np.float32)


class RotaryEmbedding(nn.Cell):
    def __init__(self, rope: RopeConfig):
        super().__init__()
        cos, sin = rope_tables(rope)
        self.cos = Parameter(Tensor(cos), name="cos", requires_grad=False)
        self.sin = Parameter(Tensor(sin), name="sin", requires_grad=False)
        self.width = rope.width
        self.half = rope.width // 2

    def construct(self, positions, q, k):
        """positions [B, L] (padding may be -1); q, k [B, L, H, D]: NeoX rotate-half."""
        pos = ops.maximum(positions, 0)
        cos = ops.gather(self.cos, pos, 0).expand_dims(2)  # [B, L, 1, D]
        sin = ops.gather(self.sin, pos, 0).expand_dims(2)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x, cos, sin):
        x32 = x.astype(ms.float32)
        rot = x32[..., : self.width]
        x1, x2 = rot[..., : self.half], rot[..., self.half:]
        rotated = (rot * cos + ops.concat((-x2, x1), -1) * sin)
        if self.width < x.shape[-1]:  # partial RoPE: the dims past the rotary width pass through
            rotated = ops.concat((rotated, x32[..., self.width:]), -1)
        return rotated.astype(x.dtype)
