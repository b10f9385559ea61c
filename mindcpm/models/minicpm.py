"""MiniCPM4 / MiniCPM4.1 (spec §2), and Llama through the same cells with neutral μP scales."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..config import ModelConfig
from ..layers.attention import PagedAttention
from ..layers.embedding import Embedding, LMHead
from ..layers.mlp import SwiGLU
from ..layers.sparse import SPARSE_STEP_INPUTS
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: ModelConfig, rotary, backend, cache_shape, dtype):
        super().__init__()
        # Each norm is applied by the projection that reads it (fused into one kernel on CPU).
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = PagedAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                        rotary, backend, cache_shape, dtype, cfg.residual_scale,
                                        input_norm=self.input_layernorm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype, cfg.residual_scale,
                          input_norm=self.post_attention_layernorm)

    def construct(self, h, positions, slot_mapping, block_tables, block_size, *extra):
        # Both sublayers take the un-normalised h and return h + residual_scale * (their output).
        h = self.self_attn(h, positions, slot_mapping, block_tables, block_size, h, *extra)
        return self.mlp(h, h)


class MiniCPMForCausalLM(nn.Cell):
    """construct(input_ids [B, L], positions [B, L], slot_mapping [B*L], block_tables [B, nb],
    logits_rows [N], then the backend's extra step inputs) -> fp32 logits [N, vocab] of the
    selected flattened rows."""

    STEP_INPUTS = ("input_ids", "positions", "slot_mapping", "block_tables", "logits_rows")

    def __init__(self, cfg: ModelConfig, backend_factory, cache_shape: tuple, block_size: int, dtype=ms.float32):
        super().__init__()
        if cfg.sparse is not None:  # the sparse backend also takes its C1/C2 metadata
            self.STEP_INPUTS = self.STEP_INPUTS + SPARSE_STEP_INPUTS
        self.block_size = block_size
        self.logit_scale = cfg.logit_scale
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, cfg.embedding_scale)
        rotary = RotaryEmbedding(cfg.rope)
        self.layers = nn.CellList([DecoderLayer(cfg, rotary, backend_factory(), cache_shape, dtype)
                                   for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size,
                              self.embed_tokens if cfg.tie_word_embeddings else None, dtype)

    def construct(self, input_ids, positions, slot_mapping, block_tables, logits_rows, *extra):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, positions, slot_mapping, block_tables, self.block_size, *extra)
        h = ops.gather(h.reshape(-1, h.shape[-1]), logits_rows, 0)
        return self.lm_head(self.norm(h) * self.logit_scale)
