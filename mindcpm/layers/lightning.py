"""The MiniMax lightning-attention layer (docs/minimax.md#lightning-attention-recurrence): fused head-major qkv projection with
SiLU, the lightning core from ops/ over a per-sequence fp32 state slot, RMSNorm over all H*D
features, a sigmoid gate on the layer's normed input, out_proj."""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..ops.device import Device
from ..parallel import even_rows
from .linear import Linear
from .norm import RMSNorm
from .params import zeros_parameter


def base_slopes(num_heads: int) -> np.ndarray:
    """ALiBi slopes, with the interleave rule for a head count that is not a power of two (docs/minimax.md#decay-slopes)."""
    def power_of_two(n: int) -> np.ndarray:
        return 2.0 ** (-8.0 * np.arange(1, n + 1) / n)
    if num_heads & (num_heads - 1) == 0:
        return power_of_two(num_heads)
    c = 1 << int(math.floor(math.log2(num_heads)))
    return np.concatenate([power_of_two(c), power_of_two(2 * c)[0::2][: num_heads - c]])


def lightning_slopes(num_heads: int, layer: int, num_layers: int) -> np.ndarray:
    """Per-head decay rates s of one layer, fp32; the layer factor is the remote code's (docs/minimax.md#decay-slopes),
    with layer the global index counting softmax layers too."""
    factor = 1 + 1e-5 if num_layers <= 1 else 1 - layer / (num_layers - 1) + 1e-5
    return (base_slopes(num_heads) * factor).astype(np.float32)


class LightningAttention(nn.Cell):
    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, layer: int, num_layers: int,
                 block: int, eps: float, backend: nn.Cell, num_state_slots: int, dtype=ms.float32,
                 device: Device | None = None):
        """backend: the device's lightning core (Device.lightning)."""
        super().__init__()
        heads = even_rows(num_heads, "lightning heads")  # tensor parallel: this rank's heads
        self.num_heads, self.head_dim, self.block = heads.stop - heads.start, head_dim, block
        # Head-major: rows [h*3D, h*3D+D) are q of head h, then its k, then its v (docs/minimax.md#lightning-attention-recurrence), so a
        # rank's heads are one contiguous block of rows of qkv_proj and of output_gate.
        self.qkv_proj = Linear(hidden_size, 3 * num_heads * head_dim, dtype, parallel="column", device=device)
        self.output_gate = Linear(hidden_size, num_heads * head_dim, dtype, parallel="column", device=device)
        # One RMS over all H*D features, in fp32, summed across the ranks' heads (docs/minimax.md#lightning-output-norm-and-gate).
        self.norm = RMSNorm(num_heads * head_dim, eps, ms.float32, sharded=True, device=device)
        self.out_proj = Linear(num_heads * head_dim, hidden_size, dtype, parallel="row", device=device)
        # Never cast with the model (docs/minimax.md#precision-rules): in bf16 exp(-s) is 1.0 for small s.
        slopes = lightning_slopes(num_heads, layer, num_layers)[heads]
        self.slopes = Parameter(Tensor(slopes, ms.float32), name="slopes", requires_grad=False)
        self.state = zeros_parameter((num_state_slots, self.num_heads, head_dim, head_dim), ms.float32, "state")
        self.backend = backend

    def construct(self, x, positions, state_slots):
        """x: [B, L, hidden] (the layer's normed input); positions [B, L]; state_slots [B]."""
        b, l, _ = x.shape
        d = self.head_dim
        qkv = ops.silu(self.qkv_proj(x).astype(ms.float32)).reshape(b, l, self.num_heads, 3 * d)
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        o = self.backend(q, k, v, self.slopes, self.state, state_slots, positions, self.block)
        gate = ops.sigmoid(self.output_gate(x).astype(ms.float32))
        return self.out_proj((gate * self.norm(o)).astype(x.dtype))
