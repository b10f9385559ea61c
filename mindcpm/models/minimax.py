"""MiniMax-M1 / MiniMax-Text-01 (docs/minimax.md): lightning-attention layers with one softmax
layer in every few, an MoE on every layer and the DeepNorm postnorm residual flow (docs/minimax.md#deepnorm-residual-flow)."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..config import ModelConfig
from ..layers.attention import PagedAttention
from ..layers.embedding import Embedding, LMHead
from ..layers.lightning import LightningAttention
from ..layers.linear import Linear
from ..layers.mlp import SwiGLU
from ..layers.moe import MoE
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: ModelConfig, layer: int, rotary, device, num_state_slots: int):
        super().__init__()
        mm = cfg.minimax
        dtype = device.dtype
        self.is_lightning = mm.lightning_layers[layer]
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device=device)
        if self.is_lightning:
            self.self_attn = LightningAttention(cfg.hidden_size, cfg.num_heads, cfg.head_dim, layer, cfg.num_layers,
                                                mm.lightning_block, mm.lightning_eps, device.lightning(),
                                                num_state_slots, dtype, device)
            self.attn_alpha, self.attn_beta = mm.linear_alpha, mm.linear_beta
        else:
            self.self_attn = PagedAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                            rotary, device, dtype)
            self.attn_alpha, self.attn_beta = mm.full_alpha, mm.full_beta
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device=device)
        self.block_sparse_moe = MoE(cfg.hidden_size, cfg.intermediate_size, mm.num_experts, mm.top_k,
                                    device.moe(), dtype, device)
        self.has_shared = mm.shared_intermediate_size > 0
        if self.has_shared:
            self.shared_mlp = SwiGLU(cfg.hidden_size, mm.shared_intermediate_size, dtype, device)
            self.coefficient = Linear(cfg.hidden_size, 1, ms.float32, exact_dtype=True, device=device)
        self.postnorm = mm.postnorm
        self.mlp_alpha, self.mlp_beta = mm.mlp_alpha, mm.mlp_beta

    def construct(self, x, positions, slot_mapping, block_tables, state_slots, block_size, *lengths):
        """lengths: the step's batch_valid_length and q_seq_lens, for the softmax layers' kernels."""
        h = self.input_layernorm(x)
        if self.is_lightning:
            a = self.self_attn(h, positions, state_slots)
        else:
            a = self.self_attn(h, positions, slot_mapping, block_tables, block_size, *lengths)
        # DeepNorm (docs/minimax.md#deepnorm-residual-flow): with postnorm the residual is the normalised input.
        x1 = (h if self.postnorm else x) * self.attn_alpha + a * self.attn_beta
        h2 = self.post_attention_layernorm(x1)
        m = self.block_sparse_moe(h2)
        if self.has_shared:
            c = ops.sigmoid(self.coefficient(h2.astype(ms.float32))).astype(h2.dtype)
            m = m * (1 - c) + self.shared_mlp(h2) * c
        return (h2 if self.postnorm else x1) * self.mlp_alpha + m * self.mlp_beta


class MiniMaxForCausalLM(nn.Cell):
    """construct(the step inputs of ops/device.py STEP_INPUTS, state_slots [B]) -> fp32 logits
    [N, vocab] of the flattened rows logits_rows [N].

    state_slots: each row's lightning-state slot (padding rows: the spare pad slot). A row whose
    first position is 0 starts from a zero state, so slots are never cleared explicitly."""

    EXTRA_INPUTS = ("state_slots",)
    PRENORM_LAYERS = False  # DeepNorm: the residual may be the normed input (docs/minimax.md#deepnorm-residual-flow)

    def __init__(self, cfg: ModelConfig, device, num_state_slots: int = 1):
        super().__init__()
        dtype = device.dtype
        self.block_size = device.block_size
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, device=device)
        rotary = RotaryEmbedding(cfg.rope)
        self.layers = nn.CellList([DecoderLayer(cfg, i, rotary, device, num_state_slots)
                                   for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device=device)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size,
                              self.embed_tokens if cfg.tie_word_embeddings else None, dtype, device)

    def construct(self, input_ids, positions, batch_valid_length, q_seq_lens, slot_mapping, block_tables,
                  logits_rows, state_slots):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, positions, slot_mapping, block_tables, state_slots, self.block_size, batch_valid_length,
                      q_seq_lens)
        h = ops.gather(h.reshape(-1, h.shape[-1]), logits_rows, 0)
        return self.lm_head(self.norm(h))
