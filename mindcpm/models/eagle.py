"""EAGLE and EAGLE-3 draft heads (docs/minicpm4.md#eagle-draft-head) in vLLM's layouts.

EAGLE for MiniCPM4 (vLLM's minicpm_eagle.py: model.embed_tokens, model.input_norm1/2, model.fc,
model.eagle_layers.{i}.*, lm_head), its decoder layers MiniCPM's own (models/minicpm.DecoderLayer)
with the residual scale scale_depth / sqrt(mup_denominator). One step: e = norm1(embed(x) *
scale_emb), h = norm2(the target's hidden state), z = fc([e, h]) (no bias), the layers, no final
norm, z / scale_width -> the head's logits and the next step's hidden state.

EAGLE-3 (vLLM's llama_eagle3.py: fc, midlayer.*, norm, lm_head, d2t): see Eagle3LlamaForCausalLM.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from mindspore import nn, ops

from ..config import ConfigError, ModelConfig, _read_json, read_config_dir
from ..layers.embedding import Embedding, LMHead
from ..layers.attention import PagedAttention
from ..layers.linear import Linear
from ..layers.mlp import SwiGLU
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from .minicpm import DecoderLayer

# Draft architecture -> speculative method.
EAGLE_ARCHITECTURES = {"EagleMiniCPMForCausalLM": "eagle", "LlamaForCausalLMEagle3": "eagle3",
                       "Eagle3LlamaForCausalLM": "eagle3"}
# The reduced draft vocabulary (FR-Spec / EAGLE-3): draft id i is target id i + d2t[i]; t2d, the
# target -> draft mask, is never needed.
DRAFT_TO_TARGET = "d2t"
HEAD_NAMES = {"eagle": "EAGLE", "eagle3": "EAGLE-3"}
UNUSED_TENSORS = ("t2d",)


@dataclass(frozen=True)
class DraftSpec:
    """A draft head's layer config, and which target hidden states it reads."""
    cfg: ModelConfig
    method: str
    # EAGLE-3: the target layers whose input residual streams are concatenated; () = EAGLE's
    # single final hidden state.
    aux_hidden_layers: tuple[int, ...] = ()

    def target_hidden(self) -> dict:
        """The RunnerConfig fields that make the target return what this head reads."""
        return {"aux_hidden_layers": self.aux_hidden_layers} if self.aux_hidden_layers else {"hidden_out": True}


def draft_config(path: str, target: ModelConfig, method: str = "eagle") -> DraftSpec:
    """The draft's config.json, checked against the target's and the method."""
    hf, source = read_config_dir(path, "draft model")
    archs = hf.get("architectures") or []
    fits = [a for a in archs if EAGLE_ARCHITECTURES.get(a) == method]
    if not fits:
        wanted = ", ".join(a for a, m in EAGLE_ARCHITECTURES.items() if m == method)
        raise ConfigError(f"{source}: draft architecture {', '.join(archs) or '(none)'} is not an "
                          f"{HEAD_NAMES[method]} head; supported: {wanted}")
    layer_arch = "MiniCPMForCausalLM" if method == "eagle" else "LlamaForCausalLM"
    cfg = ModelConfig.from_hf({**hf, "architectures": [layer_arch]}, source=source)
    cfg = replace(cfg, rope=replace(cfg.rope, table_len=target.rope.table_len))
    if method == "eagle":
        denominator = float(hf.get("mup_denominator") or cfg.num_layers)
        cfg = replace(cfg, residual_scale=float(hf.get("scale_depth", 1.0)) / math.sqrt(denominator))
    if cfg.hidden_size != target.hidden_size:
        raise ConfigError(f"{source}: draft hidden_size {cfg.hidden_size} does not match the target's "
                          f"{target.hidden_size}")
    if cfg.vocab_size != target.vocab_size:
        raise ConfigError(f"{source}: draft vocab_size {cfg.vocab_size} does not match the target's "
                          f"{target.vocab_size}")
    return DraftSpec(cfg, method, _aux_layers(hf, target, source) if method == "eagle3" else ())


def draft_method(path: str) -> str:
    """The speculative method a draft directory's architecture names ("eagle" when unreadable:
    draft_config then says what is wrong)."""
    try:
        archs = _read_json(os.path.join(path, "config.json")).get("architectures") or []
    except ConfigError:
        return "eagle"
    return next((EAGLE_ARCHITECTURES[a] for a in archs if a in EAGLE_ARCHITECTURES), "eagle")


def _aux_layers(hf: dict, target: ModelConfig, source: str) -> tuple[int, ...]:
    """vLLM's default for EAGLE-3 (low, middle and high target layers), unless the draft names them."""
    n = target.num_layers
    layers = tuple(int(i) for i in hf.get("eagle_aux_hidden_state_layer_ids") or (2, n // 2, n - 3))
    if not all(0 <= i < n for i in layers):
        raise ConfigError(f"{source}: EAGLE-3 reads the hidden states of target layers {list(layers)}, "
                          f"but the target has {n} layers")
    return layers


class EagleMiniCPMForCausalLM(nn.Cell):
    """construct(the step inputs, then hidden_states [B, L, H]: the target's at each position)
    -> (fp32 logits [N, draft vocab], the scaled hidden state [N, H]) of the rows logits_rows.

    embed_tokens / lm_head: the target's cells when the draft checkpoint has none of its own (the
    head is shared; the target's embedding carries the target's scale, which embed_rescale turns
    into the head's); draft_vocab: rows of the draft's own head (a reduced vocabulary)."""

    EXTRA_INPUTS = ("hidden_states",)
    PRENORM_LAYERS = False  # the CPU kernels' fused layers look for .layers; these are eagle_layers
    UNUSED_TENSORS = ("model.norm.weight",)  # vLLM builds this final norm but never calls it

    def __init__(self, cfg: ModelConfig, device, embed_tokens: Embedding | None = None,
                 lm_head: LMHead | None = None, draft_vocab: int | None = None, embed_rescale: float = 1.0):
        super().__init__()
        dtype, hidden = device.dtype, cfg.hidden_size
        self.embed_rescale = embed_rescale  # a shared target embedding's scale -> the head's own
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
        e = self.input_norm1(self.embed_tokens(input_ids) * self.embed_rescale)
        z = self.fc(ops.concat((e, self.input_norm2(hidden_states)), -1))
        for layer in self.eagle_layers:
            z = layer(z, positions, slot_mapping, block_tables, self.block_size, batch_valid_length, q_seq_lens,
                      *extra)
        out = ops.gather(z.reshape(-1, z.shape[-1]), logits_rows, 0) * self.logit_scale
        return self.lm_head(out), out


class Eagle3Layer(nn.Cell):
    """vLLM's llama_eagle3 mid-layer: attention reads [input_layernorm(embedding), hidden_norm(h)]
    (2H wide) and adds to h; then the usual pre-norm MLP."""

    def __init__(self, cfg: ModelConfig, rotary, device):
        super().__init__()
        dtype, hidden = device.dtype, cfg.hidden_size
        self.input_layernorm = RMSNorm(hidden, cfg.rms_norm_eps, dtype, device=device)
        self.hidden_norm = RMSNorm(hidden, cfg.rms_norm_eps, dtype, device=device)
        self.self_attn = PagedAttention(hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rotary, device, dtype,
                                        in_features=2 * hidden)
        self.post_attention_layernorm = RMSNorm(hidden, cfg.rms_norm_eps, dtype, device=device)
        self.mlp = SwiGLU(hidden, cfg.intermediate_size, dtype, device)

    def construct(self, embeds, h, positions, slot_mapping, block_tables, block_size, *extra):
        x = ops.concat((self.input_layernorm(embeds), self.hidden_norm(h)), -1)
        h = h + self.self_attn(x, positions, slot_mapping, block_tables, block_size, *extra)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3LlamaForCausalLM(nn.Cell):
    """EAGLE-3 head (vLLM's llama_eagle3 layout: fc, midlayer.*, norm, lm_head, d2t). The first
    step reads the target's aux hidden states [B, L, k*H], reduced by fc; later steps read the
    head's own [B, L, H]. Returns (logits of norm(h), h) for logits_rows."""

    EXTRA_INPUTS = ("hidden_states",)
    PRENORM_LAYERS = False
    UNUSED_TENSORS = ()

    def __init__(self, cfg: ModelConfig, device, embed_tokens: Embedding | None = None,
                 lm_head: LMHead | None = None, draft_vocab: int | None = None, embed_rescale: float = 1.0,
                 num_aux: int = 3):
        super().__init__()
        dtype, hidden = device.dtype, cfg.hidden_size
        self.embed_rescale = embed_rescale
        self.block_size = device.block_size
        self.hidden_size = hidden
        self.embed_tokens = embed_tokens or Embedding(cfg.vocab_size, hidden, dtype, cfg.embedding_scale, device)
        self.fc = Linear(num_aux * hidden, hidden, dtype, device=device)
        self.midlayer = Eagle3Layer(cfg, RotaryEmbedding(cfg.rope), device)
        self.norm = RMSNorm(hidden, cfg.rms_norm_eps, dtype, device=device)
        self.lm_head = lm_head or LMHead(draft_vocab or cfg.vocab_size, hidden, None, dtype, device)

    def construct(self, input_ids, positions, batch_valid_length, q_seq_lens, slot_mapping, block_tables,
                  logits_rows, hidden_states, *extra):
        h = hidden_states if hidden_states.shape[-1] == self.hidden_size else self.fc(hidden_states)
        h = self.midlayer(self.embed_tokens(input_ids) * self.embed_rescale, h, positions, slot_mapping, block_tables, self.block_size,
                          batch_valid_length, q_seq_lens, *extra)
        out = ops.gather(h.reshape(-1, self.hidden_size), logits_rows, 0)
        return self.lm_head(self.norm(out)), out


HEADS = {"eagle": EagleMiniCPMForCausalLM, "eagle3": Eagle3LlamaForCausalLM}
