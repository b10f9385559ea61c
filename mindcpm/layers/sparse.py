"""InfLLM-v2 sparse attention over the paged KV cache (docs/minicpm4.md#infllm-v2-overview), as composite cells.

Compressed keys live next to the paged KV cache, in the same blocks (the KV block size must be
the kernel stride, 16):
  C1 entry i = mean(K[16i : 16i+32]) is complete when 16-token block i+1 is full; it is stored
             at the physical id of block i+1.
  C2 entry j = mean(K[64j : 64j+128]) is complete with token 64j+127, in block 4j+7; it is stored
             at the physical id of that block.
So an entry depends only on tokens its block's prefix hash covers (prefix caching stays exact),
it is written once, in the step that computes its last token (a new C1 entry every 16 tokens, a
C2 entry every 64, never rebuilt from the whole cache), and it is freed with its block on
finish, abort and preemption.

Per step the runner gives (sparse_step_metadata): the cache slots and destination of every
entry completed by this step, and per row the table of where its C1/C2 entries live.

Selection (stage 1 + max-pool + top-k) yields a mask over 64-token blocks per (row, KV head,
query); all query heads of a KV group share it. Rows shorter than dense_len select every block,
which is dense attention. Stage 2 is attention restricted to the selected blocks.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..config import SparseConfig
from ..ops.infllm import block_selection_kernel, block_sparse_attention_kernel
from ..ops.native import MASKED, gather_slots
from .params import zeros_parameter

SPARSE_STEP_INPUTS = ("c1_src", "c1_dst", "c2_src", "c2_dst", "c1_table", "c2_table")
STRIDE, C2_STRIDE, BLOCK = 16, 64, 64  # kernel strides and the selection block (config-checked)
INF = float("inf")


def check_sparse_block_size(block_size: int) -> None:
    if block_size != STRIDE:
        raise ValueError(f"sparse attention keeps its compressed keys in the KV blocks and needs "
                         f"block_size {STRIDE}, got {block_size}")


class InfLLMv2Attention(nn.Cell):
    def __init__(self, sparse: SparseConfig, num_heads: int, num_kv_heads: int, head_dim: int,
                 num_entries: int, dtype=ms.float32, use_kernel: bool = True, ascendc: bool = False):
        """ascendc: selection and attention as the AscendC custom ops (ops/ascendc.py)."""
        super().__init__()
        # Selection and stage 2 as C++ kernels where they build (CPU, fp32); composites otherwise.
        use_kernel = use_kernel and dtype == ms.float32
        self.kernel = block_sparse_attention_kernel() if use_kernel else None
        self.select_kernel = block_selection_kernel() if use_kernel else None
        self.kernel_meta = Tensor(np.array([1.0 / np.sqrt(head_dim), STRIDE], np.float32))
        self.cfg = sparse
        self.current = sparse.variant == "current"
        self.window = sparse.window_blocks
        self.topk = sparse.topk + self.window if self.current else sparse.topk
        group = num_heads // num_kv_heads
        # V-new repeats a smaller group's query heads up to 16 before summing: equal copies.
        self.repeat = float(16 // group) if group < 16 else 1.0
        self.select_meta = Tensor(np.array([1.0 / np.sqrt(head_dim), sparse.init_blocks, self.window, self.topk,
                                            sparse.dense_len, float(self.current), self.repeat], np.float32))
        self.ascendc_select = self.ascendc_attend = None
        if ascendc:
            from ..ops import ascendc as custom
            scale = 1.0 / np.sqrt(head_dim)
            self.ascendc_select = custom.block_select(scale, sparse.init_blocks, self.window, self.topk,
                                                      sparse.dense_len, self.current, self.repeat)
            self.ascendc_attend = custom.sparse_attention(scale, STRIDE)
        shape = (num_entries, num_kv_heads, head_dim)
        self.c1_cache = zeros_parameter(shape, dtype, "c1_cache")
        self.c2_cache = zeros_parameter(shape, dtype, "c2_cache")
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.bmm = ops.BatchMatMul()

    def construct(self, q, k, v, k_cache, v_cache, positions, slot_mapping, block_tables, block_size, scale,
                  batch_valid_length, q_seq_lens, c1_src, c1_dst, c2_src, c2_dst, c1_table, c2_table):
        """The row lengths are the Ascend kernels' inputs; the positions say the same here."""
        b, l, hq, d = q.shape
        hkv = k.shape[2]
        ops.scatter_update(k_cache, slot_mapping, k.reshape(b * l, hkv, d))
        ops.scatter_update(v_cache, slot_mapping, v.reshape(b * l, hkv, d))
        self.update_compressed(k_cache, c1_src, c1_dst, c2_src, c2_dst)
        if self.ascendc_select is not None:
            selected = self.ascendc_select(q, self.c1_cache, self.c2_cache, positions, c1_table, c2_table)
            return self.ascendc_attend(q, k_cache, v_cache, positions, block_tables, selected)
        if self.select_kernel is not None:
            selected = self.select_kernel(q, self.c1_cache, self.c2_cache, positions, c1_table, c2_table,
                                          self.select_meta)
        else:
            selected = self.select(q, positions, c1_table, c2_table, scale)
        if self.kernel is not None:
            out = self.kernel(q, k_cache, v_cache, positions, block_tables, selected.astype(ms.int32),
                              self.kernel_meta)
            return out.astype(q.dtype)
        return self.attend(q, k_cache, v_cache, positions, block_tables, block_size, scale, selected)

    # -- C1 / C2 ---------------------------------------------------------------------------
    def update_compressed(self, k_cache, c1_src, c1_dst, c2_src, c2_dst):
        """Writes the entries completed by this step: mean of the keys at src[n] into entry dst[n]."""
        for cache, src, dst in ((self.c1_cache, c1_src, c1_dst), (self.c2_cache, c2_src, c2_dst)):
            n, w = src.shape
            keys = ops.gather(k_cache, src.reshape(-1), 0).astype(ms.float32)
            keys = keys.reshape(n, w, keys.shape[1], keys.shape[2]).mean(1)
            ops.scatter_update(cache, dst, keys.astype(cache.dtype))

    # -- stage 1, max-pool, top-k -----------------------------------------------------------
    def select(self, q, positions, c1_table, c2_table, scale):
        """Mask of the 64-token blocks each (row, KV head, query) attends to: [B, Hkv, L, NB]."""
        b, l, hq, d = q.shape
        n1 = c1_table.shape[1]
        nb = (n1 + 1) // 4  # the table has 4*NB 16-token blocks, C1 entries sit in blocks 1..
        hkv = self.c1_cache.shape[1]
        group = hq // hkv
        pos = positions.reshape(b, 1, 1, l, 1)
        lengths = positions.max(axis=1) + 1  # [B]; the row's total length (0 for a padding row)
        queries = q.reshape(b, l, hkv, group, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, group * l, d)
        queries = queries.astype(ms.float32)

        def scores(cache, table, kernel, stride):
            keys = ops.gather(cache, table.reshape(-1), 0).reshape(b, -1, hkv, d).transpose(0, 2, 1, 3)
            s = self.bmm_t(queries, keys.astype(ms.float32)) * scale
            n = table.shape[1]
            ends = ops.arange(n, dtype=ms.int32) * stride + (kernel - 1)  # last token of each kernel
            return s.reshape(b, hkv, group, l, n), ends.reshape(1, 1, 1, 1, n) <= pos, ends

        s1, vis1, ends1 = scores(self.c1_cache, c1_table, 2 * STRIDE, STRIDE)
        if self.current:
            # The normaliser comes from the coarse keys (LSE approximation): the P of a query
            # do not sum to 1; they only rank.
            s2, vis2, _ = scores(self.c2_cache, c2_table, 2 * C2_STRIDE, C2_STRIDE)
            m2 = ops.where(vis2, s2, MASKED).max(axis=-1, keepdims=True)
            total = ops.where(vis2, ops.exp(s2 - m2), 0.0).sum(axis=-1, keepdims=True)
            lse = m2 + ops.log(ops.maximum(total, 1e-30))
            any2 = vis2.any(axis=-1, keep_dims=True)
            p = ops.where(ops.logical_and(vis1, any2), ops.exp(s1 - lse), 0.0)
        else:
            m1 = ops.where(vis1, s1, MASKED).max(axis=-1, keepdims=True)
            e = ops.where(vis1, ops.exp(s1 - m1), 0.0)
            p = e / ops.maximum(e.sum(axis=-1, keepdims=True), 1e-30)  # no visible kernel -> 0
        s = p.sum(axis=2) * self.repeat  # [B, Hkv, L, N1]: reduce over the group's query heads
        exists = ends1.reshape(1, n1) < lengths.reshape(b, 1)
        s = ops.where(exists.reshape(b, 1, 1, n1), s, -INF)

        # Max-pool: block j covers kernels 4j-1 .. 4j+3 (kernel 5, stride 4, padding 1).
        fill = ops.full((b, hkv, l, 1), -INF, dtype=ms.float32)
        padded = ops.concat((fill, s, fill, fill, fill, fill), -1)  # 4*NB + 4 columns
        pooled = ops.maximum(padded[..., : 4 * nb].reshape(b, hkv, l, nb, 4).max(axis=-1),
                             padded[..., 4: 4 * nb + 4].reshape(b, hkv, l, nb, 4)[..., 0])

        blocks = ops.arange(nb, dtype=ms.int32).reshape(1, 1, 1, nb)
        qb = ops.floor_divide(positions, BLOCK).reshape(b, 1, l, 1)
        init = blocks < self.cfg.init_blocks
        if self.current:
            local = ops.logical_and(blocks >= qb - self.window, blocks <= qb)
            score = ops.where(ops.logical_or(init, local), INF, pooled)
        else:
            local = ops.logical_and(blocks > qb - self.window, blocks <= qb)
            score = ops.where(init, INF, ops.where(local, -INF, pooled))

        # Top-k with ties to the lower block index: everything above the k-th value, then the
        # lowest-indexed blocks equal to it. k = min(topk, the row's number of blocks).
        row_blocks = ops.floor_divide(lengths + (BLOCK - 1), BLOCK)
        k_row = ops.minimum(row_blocks, self.topk).reshape(b, 1, 1, 1)
        kmax = min(self.topk, nb)
        values, _ = ops.topk(score, kmax)
        at = ops.clip(k_row - 1, 0, kmax - 1).broadcast_to((b, hkv, l, 1))
        threshold = ops.gather_elements(values, 3, at)
        above = score > threshold
        tie = score == threshold
        room = k_row - above.astype(ms.int32).sum(axis=-1, keepdims=True)
        tie_rank = ops.cumsum(tie.astype(ms.int32), -1)
        chosen = ops.logical_or(above, ops.logical_and(tie, tie_rank <= room))
        if self.current:
            selected = ops.logical_and(chosen, blocks <= qb)
        else:  # the current block is dropped from the top-k; stage 2 adds the whole window
            selected = ops.logical_or(ops.logical_and(chosen, blocks < qb), local)
        if self.cfg.dense_len >= 0:
            dense = (lengths < self.cfg.dense_len).reshape(b, 1, 1, 1)
            selected = ops.where(dense, blocks <= qb, selected)
        return selected

    # -- stage 2 ---------------------------------------------------------------------------
    def attend(self, q, k_cache, v_cache, positions, block_tables, block_size, scale, selected):
        """Attention of every query to the tokens of its selected blocks (token-causal)."""
        b, l, hq, d = q.shape
        hkv = k_cache.shape[1]
        group = hq // hkv
        slots = gather_slots(block_tables, block_size)  # [B, S]
        s = slots.shape[1]
        nb = selected.shape[-1]
        keys = ops.gather(k_cache, slots.reshape(-1), 0).reshape(b, s, hkv, d).transpose(0, 2, 1, 3)
        values = ops.gather(v_cache, slots.reshape(-1), 0).reshape(b, s, hkv, d).transpose(0, 2, 1, 3)
        queries = q.reshape(b, l, hkv, group, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, group * l, d)
        scores = self.bmm_t(queries.astype(ms.float32), keys.astype(ms.float32)) * scale
        scores = scores.reshape(b, hkv, group, l, s)
        key_pos = ops.arange(s, dtype=ms.int32).reshape(1, 1, s)
        causal = (key_pos <= positions.reshape(b, l, 1)).reshape(b, 1, 1, l, s)
        in_block = selected.reshape(b, hkv, l, nb, 1).broadcast_to((b, hkv, l, nb, BLOCK)).reshape(b, hkv, 1, l, s)
        scores = ops.where(ops.logical_and(causal, in_block), scores, MASKED)
        probs = ops.softmax(scores, -1).reshape(b, hkv, group * l, s)
        out = self.bmm(probs, values.astype(ms.float32))
        out = out.reshape(b, hkv, group, l, d).transpose(0, 3, 1, 2, 4).reshape(b, l, hq * d)
        return out.astype(q.dtype)


# -- host side: the step's metadata ---------------------------------------------------------
def sparse_step_metadata(seqs, num_new: list[int], tables: np.ndarray, width: int, pad_block: int) -> dict:
    """Where this step's newly completed C1/C2 entries come from and go, and each row's tables.

    tables: the step's padded block tables [rows, nb] (16-token blocks, pad_block past the end).
    """
    rows, nb = tables.shape
    pad_slots = pad_block * STRIDE + np.arange(STRIDE, dtype=np.int32)

    def entries(kernel: int, stride: int, per_row: int, store_at):
        src = np.tile(pad_slots, (rows * per_row, kernel // STRIDE))
        dst = np.full(rows * per_row, pad_block, np.int32)
        for i, (seq, n) in enumerate(zip(seqs, num_new)):
            start, total = seq.num_cached_tokens, seq.num_cached_tokens + n
            # Entries whose last token (stride*e + kernel - 1) is computed in this step.
            first = max(0, -(-(start - kernel + 1) // stride))
            last = (total - kernel) // stride  # inclusive; < first when none
            e = np.arange(first, last + 1)
            if not len(e):
                continue
            tokens = stride * e[:, None] + np.arange(kernel)[None, :]
            rows_at = slice(i * per_row, i * per_row + len(e))
            src[rows_at] = tables[i, tokens // STRIDE] * STRIDE + tokens % STRIDE
            dst[rows_at] = tables[i, store_at(e)]
        return src.astype(np.int32), dst

    c1_src, c1_dst = entries(2 * STRIDE, STRIDE, width // STRIDE + 1, lambda e: e + 1)
    c2_src, c2_dst = entries(2 * C2_STRIDE, C2_STRIDE, width // C2_STRIDE + 1, lambda e: 4 * e + 7)
    c2_table = tables[:, 7::4]
    if not c2_table.shape[1]:  # tables shorter than 8 blocks hold no C2 entry yet
        c2_table = np.full((rows, 1), pad_block, np.int32)
    return {"c1_src": c1_src, "c1_dst": c1_dst, "c2_src": c2_src, "c2_dst": c2_dst,
            "c1_table": np.ascontiguousarray(tables[:, 1:]), "c2_table": np.ascontiguousarray(c2_table)}
