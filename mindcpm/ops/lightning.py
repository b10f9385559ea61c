"""Lightning attention (MiniMax linear attention) as a composite of ops that run on every device.

Exact block form of the recurrence S_t = lambda S_{t-1} + k_t^T v_t, o_t = q_t S_t
(docs/minimax.md#lightning-attention-recurrence, docs/minimax.md#lightning-block-form): one code path for prefill chunks of any length and for decode
(a block of one token is the recurrence, update before read).

The decay is carried per token, g[t] = s for a real token and 0 for a padding token (position
-1), with k = v = 0 there: padding then leaves the state exactly as the last real token left it,
wherever it sits in the row. Inside a block only relative exponents G_i - G_j >= 0 appear
(G = cumulative decay), so every factor is <= 1 and nothing overflows (docs/minimax.md#lightning-block-form).

A row whose first position is 0 starts from a zero state whatever its slot holds: a new
sequence, and a preempted one that recomputes from its first token, need no clearing step.

Precision (docs/minimax.md#precision-rules): slopes, decays, q/k/v, the state and the output are fp32 here whatever
the model dtype; the caller casts once after the output norm.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops


class NativeLightning(nn.Cell):
    def __init__(self):
        super().__init__()
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.bmm_ta = ops.BatchMatMul(transpose_a=True)

    def construct(self, q, k, v, slopes, state_pool, state_slots, positions, block):
        """q, k, v: [B, L, H, D] (any float dtype; computed in fp32); slopes: [H] fp32;
        state_pool: [slots, H, D, D] fp32 Parameter, updated in place at state_slots [B];
        positions: [B, L] (-1 = padding). Returns o: [B, L, H*D] fp32."""
        b, l, h, d = q.shape
        valid = (positions >= 0).astype(ms.float32)  # [B, L]
        q = q.astype(ms.float32).transpose(0, 2, 1, 3)  # [B, H, L, D]
        k = (k.astype(ms.float32) * valid.reshape(b, l, 1, 1)).transpose(0, 2, 1, 3)
        v = (v.astype(ms.float32) * valid.reshape(b, l, 1, 1)).transpose(0, 2, 1, 3)
        decay = slopes.reshape(1, h, 1) * valid.reshape(b, 1, l)  # [B, H, L]
        fresh = (positions[:, 0] > 0).astype(ms.float32).reshape(b, 1, 1, 1)
        state = ops.gather(state_pool, state_slots, 0) * fresh  # [B, H, D, D]
        outs = []
        for start in range(0, l, block):
            stop = min(start + block, l)
            o, state = self._block(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop],
                                   decay[:, :, start:stop], state)
            outs.append(o)
        ops.scatter_update(state_pool, state_slots, state)
        out = outs[0] if len(outs) == 1 else ops.concat(outs, 2)
        return out.transpose(0, 2, 1, 3).reshape(b, l, h * d)

    def _block(self, q, k, v, decay, state):
        """One block of m tokens from the incoming state (docs/minimax.md#lightning-block-form, with per-token decay)."""
        m = q.shape[2]
        cum = ops.cumsum(decay, 2)  # G_i: decay from the block start through token i
        total = cum[:, :, m - 1:m]  # [B, H, 1]
        if m == 1:
            # Decode: S = lambda S + k^T v, then o = q S.
            state = ops.exp(-total).expand_dims(-1) * state + self.bmm_ta(k, v)
            return self.bmm(q, state), state
        diff = cum.expand_dims(-1) - cum.expand_dims(-2)  # [B, H, m, m]: G_i - G_j
        causal = ops.tril(ops.ones((m, m), ms.float32)).reshape(1, 1, m, m)
        mask = ops.exp(-ops.maximum(diff, 0.0)) * causal
        intra = self.bmm(self.bmm_t(q, k) * mask, v)
        inter = self.bmm(q * ops.exp(-cum).expand_dims(-1), state)
        k_decayed = k * ops.exp(cum - total).expand_dims(-1)  # lambda^(m-1-j)
        state = ops.exp(-total).expand_dims(-1) * state + self.bmm_ta(k_decayed, v)
        return intra + inter, state
