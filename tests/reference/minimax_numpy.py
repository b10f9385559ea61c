"""MiniMax-M1 / Text-01 in float64 NumPy, written from the published maths (docs/minimax.md and its sources).

Independent of mindcpm: it reads the checkpoint's Hugging Face tensor names and the remote-code
config spelling directly. Anchors cited are docs/minimax.md's.
"""
from __future__ import annotations

import math

import numpy as np


# -- #decay-slopes ---------------------------------------------------------------------------
def base_slopes(h: int) -> np.ndarray:
    def power_of_two(n):
        return np.array([2.0 ** (-8.0 * (i + 1) / n) for i in range(n)])
    if h & (h - 1) == 0:
        return power_of_two(h)
    c = 1 << int(math.floor(math.log2(h)))
    return np.concatenate([power_of_two(c), power_of_two(2 * c)[0::2][: h - c]])


def layer_slopes(h: int, layer: int, num_layers: int) -> np.ndarray:
    factor = 1 + 1e-5 if num_layers <= 1 else 1 - layer / (num_layers - 1) + 1e-5
    return base_slopes(h) * factor


# -- #lightning-attention-recurrence / #lightning-block-form; q, k, v [H, T, D], s [H], state [H, D, D] ----------------------
def recurrence(q, k, v, s, state=None):
    h, t, d = q.shape
    S = np.zeros((h, d, d)) if state is None else state.copy()
    lam = np.exp(-s)[:, None, None]
    out = np.zeros((h, t, d))
    for i in range(t):
        S = lam * S + k[:, i, :, None] * v[:, i, None, :]
        out[:, i] = np.einsum("hd,hde->he", q[:, i], S)
    return out, S


def block_form(q, k, v, s, state=None, block=256):
    h, t, d = q.shape
    S = np.zeros((h, d, d)) if state is None else state.copy()
    out = np.zeros((h, t, d))
    for start in range(0, t, block):
        Q, K, V = q[:, start:start + block], k[:, start:start + block], v[:, start:start + block]
        m = Q.shape[1]
        i = np.arange(m)
        diff = i[:, None] - i[None, :]
        mask = np.where(diff >= 0, np.exp(-s[:, None, None] * np.maximum(diff, 0)), 0.0)
        intra = np.einsum("hij,hjd->hid", np.einsum("hid,hjd->hij", Q, K) * mask, V)
        a = np.exp(-s[:, None] * (i + 1))[..., None]
        inter = np.einsum("hid,hde->hie", Q * a, S)
        out[:, start:start + m] = intra + inter
        b = np.exp(-s[:, None] * (m - 1 - i))[..., None]
        S = np.exp(-s * m)[:, None, None] * S + np.einsum("hjd,hje->hde", K * b, V)
    return out, S


# -- building blocks -----------------------------------------------------------------------
def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def silu(x):
    return x / (1 + np.exp(-x))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def partial_rope(x, positions, rotary_dim, theta):
    """x [T, H, D]: NeoX rotate-half on dims [0, rotary_dim); the rest unchanged (#softmax-layers-and-partial-rope)."""
    half = rotary_dim // 2
    inv = theta ** (-np.arange(half) * 2.0 / rotary_dim)
    ang = positions[:, None] * inv[None]  # [T, half]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rotary_dim:]], -1)


class Config:
    """The remote-code spelling (#configuration-spellings)."""

    def __init__(self, hf: dict):
        self.hidden = hf["hidden_size"]
        self.layers = hf["num_hidden_layers"]
        self.heads = hf["num_attention_heads"]
        self.kv_heads = hf["num_key_value_heads"]
        self.head_dim = hf["head_dim"]
        self.attn_types = hf["attn_type_list"]
        self.eps = hf["rms_norm_eps"]
        self.rotary_dim = hf["rotary_dim"]
        self.theta = hf["rope_theta"]
        self.experts = hf["num_local_experts"]
        self.top_k = hf["num_experts_per_tok"]
        self.postnorm = hf["postnorm"]
        self.alpha = {0: hf["layernorm_linear_attention_alpha"], 1: hf["layernorm_full_attention_alpha"],
                      "mlp": hf["layernorm_mlp_alpha"]}
        self.beta = {0: hf["layernorm_linear_attention_beta"], 1: hf["layernorm_full_attention_beta"],
                     "mlp": hf["layernorm_mlp_beta"]}
        self.shared = hf.get("shared_intermediate_size") or 0
        if isinstance(self.shared, list):
            self.shared = self.shared[0]


# -- #lightning-attention-recurrence, #lightning-output-norm-and-gate: one lightning layer ----------------------------------------------------------
def lightning_layer(cfg, W, p, x, state, block=256, use_recurrence=False):
    """x [T, hidden] (normed input); returns (out [T, hidden], new state)."""
    h, d = cfg.heads, cfg.head_dim
    t = x.shape[0]
    qkv = silu(x @ W[p + "self_attn.qkv_proj.weight"].T).reshape(t, h, 3 * d)
    q, k, v = (qkv[..., i * d:(i + 1) * d].transpose(1, 0, 2) for i in range(3))
    s = layer_slopes(h, int(p.split(".")[2]), cfg.layers)
    o, state = (recurrence(q, k, v, s, state) if use_recurrence else block_form(q, k, v, s, state, block))
    y = rmsnorm(o.transpose(1, 0, 2).reshape(t, h * d), W[p + "self_attn.norm.weight"], 1e-6)
    y = sigmoid(x @ W[p + "self_attn.output_gate.weight"].T) * y
    return y @ W[p + "self_attn.out_proj.weight"].T, state


# -- #softmax-layers-and-partial-rope: one softmax layer: keys/values of all earlier positions are passed in ------------------
def softmax_layer(cfg, W, p, x, positions, kv):
    h, hkv, d = cfg.heads, cfg.kv_heads, cfg.head_dim
    t = x.shape[0]
    q = (x @ W[p + "self_attn.q_proj.weight"].T).reshape(t, h, d)
    k = (x @ W[p + "self_attn.k_proj.weight"].T).reshape(t, hkv, d)
    v = (x @ W[p + "self_attn.v_proj.weight"].T).reshape(t, hkv, d)
    q = partial_rope(q, positions, cfg.rotary_dim, cfg.theta)
    k = partial_rope(k, positions, cfg.rotary_dim, cfg.theta)
    keys = np.concatenate([kv[0], k]) if kv is not None else k
    values = np.concatenate([kv[1], v]) if kv is not None else v
    key_pos = np.arange(keys.shape[0])
    out = np.zeros((t, h, d))
    for head in range(h):
        g = head // (h // hkv)
        scores = q[:, head] @ keys[:, g].T / math.sqrt(d)
        scores = np.where(key_pos[None] <= positions[:, None], scores, -np.inf)
        out[:, head] = softmax(scores) @ values[:, g]
    return out.reshape(t, h * d) @ W[p + "self_attn.o_proj.weight"].T, (keys, values)


# -- #moe-routing, #shared-expert: MoE as a dense loop over tokens ---------------------------------------------------------
def moe(cfg, W, p, x):
    out = np.zeros_like(x)
    probs = softmax(x @ W[p + "block_sparse_moe.gate.weight"].T)
    for t in range(x.shape[0]):
        top = np.argsort(-probs[t], kind="stable")[: cfg.top_k]
        weights = probs[t, top] / probs[t, top].sum()
        for w, e in zip(weights, top):
            e_p = f"{p}block_sparse_moe.experts.{e}."
            hidden = silu(x[t] @ W[e_p + "w1.weight"].T) * (x[t] @ W[e_p + "w3.weight"].T)
            out[t] += w * (hidden @ W[e_p + "w2.weight"].T)
    if cfg.shared:
        shared = (silu(x @ W[p + "shared_mlp.gate_proj.weight"].T) * (x @ W[p + "shared_mlp.up_proj.weight"].T)) \
            @ W[p + "shared_mlp.down_proj.weight"].T
        c = sigmoid(x @ W[p + "coefficient.weight"].T)
        out = out * (1 - c) + shared * c
    return out


# -- #deepnorm-residual-flow: decoder layer and model ------------------------------------------------------------------
def decoder_layer(cfg, W, i, x, positions, cache, use_recurrence=False, block=256):
    """cache: the layer's lightning state or (keys, values), None at the start. Returns (x, cache)."""
    p = f"model.layers.{i}."
    kind = cfg.attn_types[i]
    h = rmsnorm(x, W[p + "input_layernorm.weight"], cfg.eps)
    if kind == 0:
        a, cache = lightning_layer(cfg, W, p, h, cache, block, use_recurrence)
    else:
        a, cache = softmax_layer(cfg, W, p, h, positions, cache)
    x1 = cfg.alpha[kind] * (h if cfg.postnorm else x) + cfg.beta[kind] * a
    h2 = rmsnorm(x1, W[p + "post_attention_layernorm.weight"], cfg.eps)
    out = cfg.alpha["mlp"] * (h2 if cfg.postnorm else x1) + cfg.beta["mlp"] * moe(cfg, W, p, h2)
    return out, cache


def forward(cfg, W, ids, caches=None, start=0, use_recurrence=False, block=256):
    """Logits [T, vocab] of tokens ids at positions start.., continuing from caches (list per layer)."""
    caches = caches if caches is not None else [None] * cfg.layers
    positions = np.arange(start, start + len(ids))
    x = W["model.embed_tokens.weight"][np.asarray(ids)]
    for i in range(cfg.layers):
        x, caches[i] = decoder_layer(cfg, W, i, x, positions, caches[i], use_recurrence, block)
    x = rmsnorm(x, W["model.norm.weight"], cfg.eps)
    return x @ W["lm_head.weight"].T, caches


def greedy(cfg, W, prompt, steps):
    """Prefill, then one token at a time from the caches (decode = the recurrence)."""
    logits, caches = forward(cfg, W, prompt)
    tokens = [int(np.argmax(logits[-1]))]
    for _ in range(steps - 1):
        logits, caches = forward(cfg, W, [tokens[-1]], caches, len(prompt) + len(tokens) - 1, use_recurrence=True)
        tokens.append(int(np.argmax(logits[-1])))
    return tokens


def load(path: str) -> dict:
    from safetensors.numpy import load_file
    return {k: v.astype(np.float64) for k, v in load_file(path).items()}
