"""InfLLM-v2 sparse attention for one sequence, in numpy, written from docs/minicpm4.md#infllm-v2-overview.

Independent of mindcpm: the whole K/V of the sequence in, the chunk's attention output out.
Both variants: "current" (V-new: LSE normaliser over C2, window inside the top-k) and
"june2025" (V-old: exact softmax over C1, window excluded from the top-k and added by stage 2).
Conventions of docs/minicpm4.md#infllm-v2-conventions: top-k ties go to the lower block index; dense or sparse is decided on the
sequence's total length.
"""
from __future__ import annotations

import numpy as np


def compress(k: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """docs/minicpm4.md#infllm-v2-compressed-keys: mean of every complete window K[stride*j : stride*j + kernel]; k: [Lk, H, d]."""
    n = (len(k) - kernel) // stride + 1 if len(k) >= kernel else 0
    return np.stack([k[stride * j: stride * j + kernel].mean(0) for j in range(n)]) if n else k[:0]


def block_scores(q, k, cfg) -> np.ndarray:
    """docs/minicpm4.md#infllm-v2-relevance-scores and #infllm-v2-pooling, before forcing: S max-pooled to 64-token blocks, [Hkv, Lq, NB] (float64)."""
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    scale = 1.0 / np.sqrt(d)
    pos = np.arange(lk - lq, lk)
    c1 = compress(k, cfg.kernel_size, cfg.kernel_stride)
    c2 = compress(k, cfg.kernel_size * 4, cfg.kernel_stride * 4)
    n1 = len(c1)
    vis1 = cfg.kernel_stride * np.arange(n1)[None, :] + cfg.kernel_size - 1 <= pos[:, None]  # [Lq, N1]
    vis2 = 4 * cfg.kernel_stride * np.arange(len(c2))[None, :] + 4 * cfg.kernel_size - 1 <= pos[:, None]
    # Groups smaller than 16 are repeated up to 16 query heads (V-new); the copies are equal.
    repeat = 16 // group if group < 16 else 1
    s = np.zeros((hkv, lq, n1))
    for h in range(hkv):
        for g in range(group):
            qg = q[:, h * group + g].astype(np.float64)
            s1 = scale * qg @ c1[:, h].astype(np.float64).T  # [Lq, N1]
            if cfg.variant == "current":
                s2 = scale * qg @ c2[:, h].astype(np.float64).T
                m = np.where(vis2, s2, -np.inf).max(-1, keepdims=True) if len(c2) else np.full((lq, 1), -np.inf)
                m0 = np.where(np.isfinite(m), m, 0.0)
                with np.errstate(divide="ignore"):
                    lse = m0 + np.log(np.where(vis2, np.exp(s2 - m0), 0.0).sum(-1, keepdims=True))
                p = np.where(vis1 & np.isfinite(lse), np.exp(s1 - lse), 0.0)
            else:
                m = np.where(vis1, s1, -np.inf).max(-1, keepdims=True) if n1 else np.zeros((lq, 1))
                e = np.where(vis1, np.exp(s1 - np.where(np.isfinite(m), m, 0.0)), 0.0)
                tot = e.sum(-1, keepdims=True)
                p = np.divide(e, tot, out=np.zeros_like(e), where=tot > 0)  # NaN rows -> 0
            for _ in range(repeat):
                s[h] += p
    nb = -(-lk // cfg.block_size)
    per = cfg.block_size // cfg.kernel_stride  # 4
    pooled = np.full((hkv, lq, nb), -np.inf)
    for b in range(nb):
        lo, hi = max(per * b - 1, 0), min(per * b + per, n1)  # kernels 4b-1 .. 4b+3 that exist
        if lo < hi:
            pooled[:, :, b] = s[:, :, lo:hi].max(-1)
    return pooled


def select_blocks(q, k, cfg) -> list[list[list[int]]]:
    """docs/minicpm4.md#infllm-v2-top-k: the top-k block indices of every (KV head, query), ascending, -1 dropped."""
    lq = len(q)
    lk, hkv, _ = k.shape
    pos = np.arange(lk - lq, lk)
    score = block_scores(q, k, cfg)
    nb = score.shape[-1]
    nl = cfg.window_size // cfg.block_size
    current = cfg.variant == "current"
    kk = min(cfg.topk + nl, nb) if current else min(cfg.topk, nb)
    out = []
    for h in range(hkv):
        rows = []
        for i in range(lq):
            qb = pos[i] // cfg.block_size
            sc = score[h, i].copy()
            for b in range(nb):
                local = (qb - nl <= b <= qb) if current else (qb - nl < b <= qb)
                if b < cfg.init_blocks:
                    sc[b] = np.inf
                elif local:
                    sc[b] = np.inf if current else -np.inf
            order = np.argsort(-sc, kind="stable")[:kk]  # stable: ties to the lower index
            idx = np.sort(order)
            idx = idx[idx <= qb] if current else idx[idx < qb]
            rows.append(idx.tolist())
        out.append(rows)
    return out


def attention(q, k, v, cfg) -> tuple[np.ndarray, list | None]:
    """The chunk's output [Lq, Hq, d] and its selection (None when the sequence is dense).
    q: [Lq, Hq, d] (after RoPE); k, v: [Lk, Hkv, d], the whole sequence up to the chunk's end."""
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    pos = np.arange(lk - lq, lk)
    dense = cfg.dense_len != -1 and lk < cfg.dense_len
    selected = None if dense else select_blocks(q, k, cfg)
    nl = cfg.window_size // cfg.block_size
    out = np.zeros((lq, hq, d))
    for h in range(hkv):
        for i in range(lq):
            keys = np.arange(pos[i] + 1)  # token-level causal mask
            if selected is not None:
                blocks = set(selected[h][i])
                if cfg.variant == "june2025":  # stage 2 adds the local window itself
                    qb = pos[i] // cfg.block_size
                    blocks |= set(range(max(qb - nl + 1, 0), qb + 1))
                keys = keys[np.isin(keys // cfg.block_size, sorted(blocks))]
            for g in range(group):
                qh = q[i, h * group + g].astype(np.float64)
                s = (k[keys, h].astype(np.float64) @ qh) / np.sqrt(d)
                p = np.exp(s - s.max())
                out[i, h * group + g] = (p / p.sum()) @ v[keys, h].astype(np.float64)
    return out, selected
