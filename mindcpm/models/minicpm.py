"""MiniCPM4 / MiniCPM4.1 (docs/minicpm4.md#mup-scales), and Llama through the same cells with neutral μP scales."""
from __future__ import annotations

from mindspore import nn, ops

from ..config import ModelConfig
from ..layers.attention import PagedAttention
from ..layers.embedding import Embedding, LMHead
from ..layers.mlp import SwiGLU
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: ModelConfig, rotary, device):
        super().__init__()
        dtype = device.dtype
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device=device)
        self.self_attn = PagedAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                        rotary, device, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device=device)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype, device)
        self.residual_scale = cfg.residual_scale  # μP: scale_depth / sqrt(num_layers); 1 for Llama

    def construct(self, h, positions, slot_mapping, block_tables, block_size, *extra):
        s = self.residual_scale
        h = h + s * self.self_attn(self.input_layernorm(h), positions, slot_mapping, block_tables, block_size, *extra)
        return h + s * self.mlp(self.post_attention_layernorm(h))


class MiniCPMForCausalLM(nn.Cell):
    """construct(the step inputs of ops/device.py STEP_INPUTS, then the attention core's extras)
    -> fp32 logits [N, vocab] of the flattened rows logits_rows [N]."""

    EXTRA_INPUTS = ()
    PRENORM_LAYERS = True  # every layer is h += s*attn(norm(h)); h += s*mlp(norm(h)) (Device.fuse_blocks)

    def __init__(self, cfg: ModelConfig, device, hidden_out: bool = False, aux_hidden_layers: tuple = ()):
        super().__init__()
        dtype = device.dtype
        # Also return every position's hidden state for a draft head: the final one (EAGLE), or the
        # residual stream entering each of aux_hidden_layers, concatenated (EAGLE-3).
        self.hidden_out = hidden_out
        self.aux_hidden_layers = tuple(aux_hidden_layers)
        self.block_size = device.block_size
        self.logit_scale = cfg.logit_scale
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, cfg.embedding_scale, device)
        rotary = RotaryEmbedding(cfg.rope)
        self.layers = nn.CellList([DecoderLayer(cfg, rotary, device) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device=device)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size,
                              self.embed_tokens if cfg.tie_word_embeddings else None, dtype, device)

    def construct(self, input_ids, positions, batch_valid_length, q_seq_lens, slot_mapping, block_tables,
                  logits_rows, *extra):
        h = self.embed_tokens(input_ids)
        inputs = ()  # each layer's input; the graph keeps only those aux_hidden_layers name
        for layer in self.layers:
            inputs += (h,)
            h = layer(h, positions, slot_mapping, block_tables, self.block_size, batch_valid_length, q_seq_lens,
                      *extra)
        h = h.reshape(-1, h.shape[-1])
        if self.hidden_out:
            hidden = self.norm(h) * self.logit_scale
            return self.lm_head(ops.gather(hidden, logits_rows, 0)), hidden
        logits = self.lm_head(self.norm(ops.gather(h, logits_rows, 0)) * self.logit_scale)
        if self.aux_hidden_layers:
            return logits, ops.concat(tuple(inputs[i] for i in self.aux_hidden_layers), -1).reshape(h.shape[0], -1)
        return logits
