"""A MiniCPM forward pass with InfLLM-v2 sparse attention, float64 NumPy, written from the
published algorithm (InfLLM-V2 paper arXiv 2509.24663 section 3; MiniCPM4 technical report
arXiv 2506.07900 section 2.1; the MiniCPM4/4.1 Hugging Face modeling code) and the conventions
docs/minicpm4.md#infllm-v2-conventions fixes. Independent of mindcpm: per query, per KV head,
straight from the definitions (which kernels a query sees, which kernels overlap a block),
with no pooling windows, padded tables or masks.

Every position is computed once, in the forward call (prefill chunk or decode step) that the
engine computed it in: `Reference.extend(ids)` is one such call. Whether a call is dense is
decided on its total length (tokens before it + its own), as the official code does.
"""
from __future__ import annotations

import math

import numpy as np

C1_SIZE, C1_STRIDE = 32, 16  # a fine compressed key: the mean of 32 keys, one every 16 tokens
C2_SIZE, C2_STRIDE = 128, 64  # a coarse one ("current" only: the softmax normaliser)
BLOCK = 64  # what is selected: 64-token blocks of keys
# The sparse_config the MiniCPM4 README documents; a checkpoint's keys override them.
README_SPARSE_CONFIG = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                        "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192, "variant": "current"}


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, pos, theta):
    """Rotate-half RoPE; x [H, d] of the token at position pos."""
    half = x.shape[-1] // 2
    ang = pos * theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def compressed(keys, size, stride, total):
    """[(first token, last token, mean key)] of every window of `size` keys, one every `stride`
    tokens, complete within the first `total` tokens."""
    return [(s, s + size - 1, keys[s:s + size].mean(0)) for s in range(0, total - size + 1, stride)]


def chosen_blocks(q, keys, p, total, sc):
    """The 64-token blocks query position p (its group's query heads q [G, d]) attends to, keys
    [>= total, d] of its KV head, in a call of `total` tokens."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    c1 = compressed(keys, C1_SIZE, C1_STRIDE, total)
    seen1 = [last <= p for _, last, _ in c1]  # a kernel counts once all its tokens are in the past
    relevance = np.zeros(len(c1))
    for qh in q:
        s1 = np.array([scale * qh @ c for _, _, c in c1])
        if sc["variant"] == "current":
            # Normalised by the log-sum-exp of the coarse kernels the query sees; none: nothing.
            s2 = [scale * qh @ c for _, last, c in compressed(keys, C2_SIZE, C2_STRIDE, total) if last <= p]
            if not s2:
                continue
            lse = max(s2) + math.log(sum(math.exp(v - max(s2)) for v in s2))
            relevance += [math.exp(v - lse) if ok else 0.0 for v, ok in zip(s1, seen1)]
        elif any(seen1):  # june2025: an exact softmax over the fine kernels it sees
            top = max(v for v, ok in zip(s1, seen1) if ok)
            e = np.array([math.exp(v - top) if ok else 0.0 for v, ok in zip(s1, seen1)])
            relevance += e / e.sum()
    n_blocks = -(-total // BLOCK)
    qb = p // BLOCK
    local = sc["window_size"] // BLOCK
    score = []
    for b in range(n_blocks):
        # A block's score: the best kernel sharing a token with it.
        overlap = [r for (first, last, _), r in zip(c1, relevance) if first < BLOCK * (b + 1) and last >= BLOCK * b]
        value = max(overlap) if overlap else -math.inf
        if b < sc["init_blocks"]:
            value = math.inf
        elif sc["variant"] == "current" and qb - local <= b <= qb:
            value = math.inf
        elif sc["variant"] == "june2025" and qb - local < b <= qb:
            value = -math.inf  # the attention adds the window itself
        score.append(value)
    k = min(sc["topk"] + (local if sc["variant"] == "current" else 0), n_blocks)
    top = sorted(range(n_blocks), key=lambda b: (-score[b], b))[:k]  # ties: the lower block
    if sc["variant"] == "current":
        return {b for b in top if b <= qb}
    return {b for b in top if b < qb} | set(range(max(qb - local + 1, 0), qb + 1))


class Reference:
    """One sequence through a MiniCPM checkpoint (HF tensor names, config.json dict)."""

    def __init__(self, hf: dict, weights: dict):
        self.hf, self.w = hf, weights
        self.sc = {**README_SPARSE_CONFIG, **hf["sparse_config"]}
        assert not self.sc["use_nope"] and (self.sc["kernel_size"], self.sc["kernel_stride"], self.sc["block_size"]) \
            == (C1_SIZE, C1_STRIDE, BLOCK)
        self.layers = hf["num_hidden_layers"]
        self.heads, self.kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
        self.d = hf["hidden_size"] // self.heads
        self.keys = [np.zeros((0, self.kv_heads, self.d)) for _ in range(self.layers)]
        self.values = [np.zeros((0, self.kv_heads, self.d)) for _ in range(self.layers)]
        self.ids: list[int] = []

    def extend(self, ids: list[int]) -> np.ndarray:
        """One forward call computing `ids` after the tokens so far: their logits [n, vocab]."""
        hf, w = self.hf, self.w
        start = len(self.ids)
        self.ids += list(ids)
        total = len(self.ids)
        dense = 0 <= self.sc["dense_len"] and total < self.sc["dense_len"]
        residual = hf["scale_depth"] / math.sqrt(self.layers)
        x = w["model.embed_tokens.weight"][np.asarray(ids)] * hf["scale_emb"]
        for i in range(self.layers):
            p_ = f"model.layers.{i}."
            h = rms(x, w[p_ + "input_layernorm.weight"], hf["rms_norm_eps"])
            q = (h @ w[p_ + "self_attn.q_proj.weight"].T).reshape(len(ids), self.heads, self.d)
            k = (h @ w[p_ + "self_attn.k_proj.weight"].T).reshape(len(ids), self.kv_heads, self.d)
            v = (h @ w[p_ + "self_attn.v_proj.weight"].T).reshape(len(ids), self.kv_heads, self.d)
            positions = range(start, total)
            q = np.stack([rope(q[t], p, hf.get("rope_theta", 10000.0)) for t, p in enumerate(positions)])
            k = np.stack([rope(k[t], p, hf.get("rope_theta", 10000.0)) for t, p in enumerate(positions)])
            self.keys[i] = np.concatenate([self.keys[i], k])
            self.values[i] = np.concatenate([self.values[i], v])
            att = np.stack([self.attend(i, q[t], p, total, dense) for t, p in enumerate(positions)])
            x = x + residual * (att.reshape(len(ids), -1) @ w[p_ + "self_attn.o_proj.weight"].T)
            h = rms(x, w[p_ + "post_attention_layernorm.weight"], hf["rms_norm_eps"])
            gate, up = h @ w[p_ + "mlp.gate_proj.weight"].T, h @ w[p_ + "mlp.up_proj.weight"].T
            x = x + residual * ((gate / (1 + np.exp(-gate)) * up) @ w[p_ + "mlp.down_proj.weight"].T)
        x = rms(x, w["model.norm.weight"], hf["rms_norm_eps"]) / (hf["hidden_size"] / hf["dim_model_base"])
        return x @ w["lm_head.weight"].T

    def attend(self, layer, q, p, total, dense):
        """Attention output [Hq, d] of position p (q [Hq, d])."""
        group = self.heads // self.kv_heads
        out = np.zeros_like(q)
        for g in range(self.kv_heads):
            keys, values = self.keys[layer][:, g], self.values[layer][:, g]
            heads = q[g * group:(g + 1) * group]
            visible = np.arange(p + 1)
            if not dense:
                blocks = chosen_blocks(heads, keys, p, total, self.sc)
                visible = visible[np.isin(visible // BLOCK, sorted(blocks))]
            for j, qh in enumerate(heads):
                s = keys[visible] @ qh / math.sqrt(self.d)
                e = np.exp(s - s.max())
                out[g * group + j] = e / e.sum() @ values[visible]
        return out
