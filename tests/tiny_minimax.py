"""Tiny random MiniMax-M1 checkpoints for tests and benchmarks: HF tensor names (docs/minimax.md#weight-names) written
straight from numpy, in the remote-code config spelling (§1.1) or the HF-native one (§1.3).

    make_tiny_minimax(path)                                   # the tests' default shape
    make_tiny_minimax(path, minimax_config(attn_types=[0]*4)) # all-lightning, e.g. for benchmarks
"""
from __future__ import annotations

import json
import os

import numpy as np

from tests.tiny import VOCAB, write_byte_tokenizer


def minimax_config(hidden: int = 256, heads: int = 4, head_dim: int = 64, kv_heads: int = 2,
                   attn_types=(0, 0, 0, 1, 0, 0, 0, 1), experts: int = 4, top_k: int = 2,
                   intermediate: int = 128, vocab: int = VOCAB, rotary_dim: int | None = None,
                   shared_intermediate: int = 0, postnorm: bool = True, max_pos: int = 4096) -> dict:
    """The remote-code (MiniMaxM1ForCausalLM) spelling; alpha = (2N)^(1/4) as in M1 (§1.1)."""
    n = len(attn_types)
    alpha = (2 * n) ** 0.25
    return {
        "architectures": ["MiniMaxM1ForCausalLM"], "model_type": "minimax_m1",
        "hidden_size": hidden, "num_hidden_layers": n, "num_attention_heads": heads, "head_dim": head_dim,
        "num_key_value_heads": kv_heads, "attn_type_list": list(attn_types), "hidden_act": "silu",
        "intermediate_size": intermediate, "num_local_experts": experts, "num_experts_per_tok": top_k,
        "shared_intermediate_size": shared_intermediate, "shared_moe_mode": "sigmoid",
        "layernorm_full_attention_alpha": alpha, "layernorm_full_attention_beta": 1.0,
        "layernorm_linear_attention_alpha": alpha, "layernorm_linear_attention_beta": 1.0,
        "layernorm_mlp_alpha": alpha, "layernorm_mlp_beta": 1.0, "postnorm": postnorm,
        "rms_norm_eps": 1e-5, "rotary_dim": rotary_dim or head_dim // 2, "rope_theta": 10000000.0,
        "max_position_embeddings": max_pos, "vocab_size": vocab, "tie_word_embeddings": False,
        "bos_token_id": 256, "eos_token_id": 257,
    }


def hf_native_spelling(cfg: dict) -> dict:
    """The same model in the transformers-native (model_type minimax) spelling (§1.3)."""
    out = {k: v for k, v in cfg.items() if not k.startswith("layernorm_") and k not in (
        "attn_type_list", "rotary_dim", "postnorm")}
    out.update(architectures=["MiniMaxForCausalLM"], model_type="minimax",
               layer_types=["full_attention" if t else "linear_attention" for t in cfg["attn_type_list"]],
               partial_rotary_factor=cfg["rotary_dim"] / cfg["head_dim"])
    for ours, theirs in (("full_attention", "full_attn"), ("linear_attention", "linear_attn"), ("mlp", "mlp")):
        out[f"{theirs}_alpha_factor"] = cfg[f"layernorm_{ours}_alpha"]
        out[f"{theirs}_beta_factor"] = cfg[f"layernorm_{ours}_beta"]
    return out


def random_weights(cfg: dict, seed: int = 0, std: float = 0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hidden, h, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
    hkv, inter, e = cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["num_local_experts"]

    def w(*shape, scale=std):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    out = {"model.embed_tokens.weight": w(cfg["vocab_size"], hidden, scale=1.0),
           "model.norm.weight": norm(hidden), "lm_head.weight": w(cfg["vocab_size"], hidden)}
    for i, kind in enumerate(cfg["attn_type_list"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = norm(hidden)
        out[p + "post_attention_layernorm.weight"] = norm(hidden)
        if kind == 0:
            out[p + "self_attn.qkv_proj.weight"] = w(3 * h * d, hidden, scale=0.1)
            out[p + "self_attn.output_gate.weight"] = w(h * d, hidden)
            out[p + "self_attn.norm.weight"] = norm(h * d)
            out[p + "self_attn.out_proj.weight"] = w(hidden, h * d)
        else:
            out[p + "self_attn.q_proj.weight"] = w(h * d, hidden, scale=0.1)
            out[p + "self_attn.k_proj.weight"] = w(hkv * d, hidden, scale=0.1)
            out[p + "self_attn.v_proj.weight"] = w(hkv * d, hidden)
            out[p + "self_attn.o_proj.weight"] = w(hidden, h * d)
        out[p + "block_sparse_moe.gate.weight"] = w(e, hidden, scale=0.2)  # stored fp32, like M1 (§1.1)
        for x in range(e):
            q = f"{p}block_sparse_moe.experts.{x}."
            out[q + "w1.weight"] = w(inter, hidden)
            out[q + "w3.weight"] = w(inter, hidden)
            out[q + "w2.weight"] = w(hidden, inter)
        shared = cfg.get("shared_intermediate_size") or 0
        if shared:
            out[p + "shared_mlp.gate_proj.weight"] = w(shared, hidden)
            out[p + "shared_mlp.up_proj.weight"] = w(shared, hidden)
            out[p + "shared_mlp.down_proj.weight"] = w(hidden, shared)
            out[p + "coefficient.weight"] = w(1, hidden)
    return out


def make_tiny_minimax(path: str, cfg: dict | None = None, seed: int = 0) -> str:
    from safetensors.numpy import save_file
    cfg = cfg or minimax_config()
    os.makedirs(path, exist_ok=True)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        save_file(random_weights(cfg, seed), os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f)
        write_byte_tokenizer(path)
    return path
