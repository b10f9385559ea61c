"""EAGLE draft head for MiniCPM4 (docs/minicpm4.md#eagle-draft-head), in the layout of vLLM's
minicpm_eagle.py: model.embed_tokens, model.input_norm1/2, model.fc, model.eagle_layers.{i}.*,
lm_head. The decoder layers are MiniCPM's own (models/minicpm.DecoderLayer), built from a config
whose residual scale is scale_depth / sqrt(mup_denominator).

One step: e = norm1(embed(x) * scale_emb), h = norm2(the target's hidden state),
z = fc([e, h]) (no bias), the layers, no final norm, z / scale_width -> the head's logits and
the next step's hidden state.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace

from mindspore import nn, ops

from ..config import ConfigError, ModelConfig, _read_json
from ..layers.embedding import Embedding, LMHead
from ..layers.linear import Linear
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from .minicpm import DecoderLayer

EAGLE_ARCHITECTURES = ("EagleMiniCPMForCausalLM",)
# Tensors of the released layout that the step never reads: the final norm vLLM builds but does
# not call, and the reduced vocabulary's target -> draft mask (only draft -> target is needed).
UNUSED_TENSORS = ("model.norm.weight", "norm.weight", "t2d")
# The reduced draft vocabulary (FR-Spec / EAGLE-3): draft id i is target id i + d2t[i].
DRAFT_TO_TARGET = "d2t"


def draft_config(path: str, target: ModelConfig) -> ModelConfig:
    """The draft's config.json as a MiniCPM layer config, checked against the target's."""
    source = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ConfigError(f"draft model directory not found: {path}")
    if not os.path.isfile(source):
        raise ConfigError(f"no config.json in draft model directory {path}")
    hf = _read_json(source)
    archs = hf.get("architectures") or []
    if not set(archs) & set(EAGLE_ARCHITECTURES):
        raise ConfigError(f"{source}: draft architecture {', '.join(archs) or '(none)'} is not an EAGLE head; "
                          f"supported: {', '.join(EAGLE_ARCHITECTURES)}")
    cfg = ModelConfig.from_hf({**hf, "architectures": ["MiniCPMForCausalLM"]}, source=source)
    denominator = float(hf.get("mup_denominator") or cfg.num_layers)
    cfg = replace(cfg, residual_scale=float(hf.get("scale_depth", 1.0)) / math.sqrt(denominator),
                  rope=replace(cfg.rope, table_len=target.rope.table_len))
    if cfg.hidden_size != target.hidden_size:
        raise ConfigError(f"{source}: draft hidden_size {cfg.hidden_size} does not match the target's "
                          f"{target.hidden_size}")
    if cfg.vocab_size != target.vocab_size:
        raise ConfigError(f"{source}: draft vocab_size {cfg.vocab_size} does not match the target's "
                          f"{target.vocab_size}")
    return cfg


class EagleMiniCPMForCausalLM(nn.Cell):
    """construct(the step inputs, then hidden_states [B, L, H]: the target's at each position)
    -> (fp32 logits [N, draft vocab], the scaled hidden state [N, H]) of the rows logits_rows.

    embed_tokens / lm_head: the target's cells when the draft checkpoint has none of its own (the
    head is shared); draft_vocab: rows of the draft's own head (a reduced vocabulary)."""

    EXTRA_INPUTS = ("hidden_states",)
    PRENORM_LAYERS = False  # the CPU kernels' fused layers look for .layers; these are eagle_layers

    def __init__(self, cfg: ModelConfig, device, embed_tokens: Embedding | None = None,
                 lm_head: LMHead | None = None, draft_vocab: int | None = None):
        super().__init__()
        dtype, hidden = device.dtype, cfg.hidden_size
        self.block_size = device.block_size
        self.logit_scale = cfg.logit_scale
        self.embed_tokens = embed_tokens or Embedding(cfg.vocab_size, hidden, dtype, cfg.embedding_scale, device)
        self.input_norm1 = RMSNorm(hidden, cfg.rms_norm_eps, dtype, device=device)
        self.input_norm2 = RMSNorm(hidden, cfg.rms_norm_eps, dtype, device=device)
        self.fc = Linear(2 * hidden, hidden, dtype, device=device)
        rotary = RotaryEmbedding(cfg.rope)
        self.eagle_layers = nn.CellList([DecoderLayer(cfg, rotary, device) for _ in range(cfg.num_layers)])
        self.lm_head = lm_head or LMHead(draft_vocab or cfg.vocab_size, hidden, None, dtype, device)

    def construct(self, input_ids, positions, batch_valid_length, q_seq_lens, slot_mapping, block_tables,
                  logits_rows, hidden_states, *extra):
        e = self.input_norm1(self.embed_tokens(input_ids))
        z = self.fc(ops.concat((e, self.input_norm2(hidden_states)), -1))
        for layer in self.eagle_layers:
            z = layer(z, positions, slot_mapping, block_tables, self.block_size, batch_valid_length, q_seq_lens,
                      *extra)
        out = ops.gather(z.reshape(-1, z.shape[-1]), logits_rows, 0) * self.logit_scale
        return self.lm_head(out), out
