"""InfLLM-v2 sparse attention (mindcpm/layers/sparse.py) against the numpy reference written from
docs/minicpm4.md#infllm-v2-overview (tests/reference/infllm_numpy.py): selected blocks and outputs, chunked prefill and
decode, both variants, lengths around every boundary."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from tests.reference import infllm_numpy as ref

HQ, HKV, D = 4, 2, 16
NUM_BLOCKS = 48  # 16-token blocks: 768 tokens


def sparse_cfg(**kw):
    from mindcpm.config import SparseConfig
    base = dict(window_size=128, topk=3, init_blocks=1, dense_len=-1)
    return replace(SparseConfig(), **{**base, **kw})


def _table_width(tokens: int) -> int:
    from mindcpm.engine.runner import bucket
    return max(8, bucket(-(-tokens // 16)))


class Harness:
    """One sequence through the cell chunk by chunk, with a scrambled block table."""

    def __init__(self, cfg, seed=0, total=700, kernel=False, head_dim=D):
        import mindspore as ms
        from mindspore import Parameter, Tensor
        from mindcpm.layers.sparse import InfLLMv2Attention
        rng = np.random.default_rng(seed)
        self.d = D = head_dim
        self.q = rng.normal(size=(total, HQ, D)).astype(np.float32)
        # Correlated keys give scores with structure (and ties across shared kernels).
        self.k = (rng.normal(size=(total, HKV, D)) + rng.normal(size=(1, HKV, D))).astype(np.float32)
        self.v = rng.normal(size=(total, HKV, D)).astype(np.float32)
        self.cfg = cfg
        self.cell = InfLLMv2Attention(cfg, HQ, HKV, D, NUM_BLOCKS + 1, use_kernel=kernel)
        assert (self.cell.kernel is not None) == kernel
        shape = (NUM_BLOCKS + 1) * 16, HKV, D
        self.k_cache = Parameter(Tensor(np.zeros(shape, np.float32)), name="k", requires_grad=False)
        self.v_cache = Parameter(Tensor(np.zeros(shape, np.float32)), name="v", requires_grad=False)
        self.blocks = rng.permutation(NUM_BLOCKS).astype(np.int32)
        self.cached = 0
        self.ms, self.Tensor = ms, Tensor

    def step(self, n: int):
        """Computes tokens [cached, cached+n); returns (output [n, HQ, D], selection mask [HKV, n, NB])."""
        from mindcpm.layers.sparse import sparse_step_metadata
        from mindcpm.ops.native import gather_slots  # noqa: F401  (the cell uses it)
        T, D = self.Tensor, self.d
        start, total = self.cached, self.cached + n
        width = max(16, 1 << (n - 1).bit_length()) if n > 1 else 1
        nb = _table_width(total)
        table = np.full((1, nb), NUM_BLOCKS, np.int32)
        used = -(-total // 16)
        table[0, :used] = self.blocks[:used]
        pos = np.full((1, width), -1, np.int32)
        pos[0, :n] = np.arange(start, total)
        slots = np.full(width, NUM_BLOCKS * 16, np.int32)
        slots[:n] = table[0, pos[0, :n] // 16] * 16 + pos[0, :n] % 16
        q = np.zeros((1, width, HQ, D), np.float32)
        k = np.zeros((1, width, HKV, D), np.float32)
        v = np.zeros((1, width, HKV, D), np.float32)
        q[0, :n], k[0, :n], v[0, :n] = self.q[start:total], self.k[start:total], self.v[start:total]
        meta = sparse_step_metadata([SimpleNamespace(num_cached_tokens=start)], [n], table, width, NUM_BLOCKS)
        meta = {key: T(val) for key, val in meta.items()}
        scale = 1.0 / np.sqrt(D)
        import mindspore.ops as ops
        ops.scatter_update(self.k_cache, T(slots), T(k.reshape(width, HKV, D)))
        ops.scatter_update(self.v_cache, T(slots), T(v.reshape(width, HKV, D)))
        cell = self.cell
        cell.update_compressed(self.k_cache, meta["c1_src"], meta["c1_dst"], meta["c2_src"], meta["c2_dst"])
        if cell.select_kernel is not None:
            sel = cell.select_kernel(T(q), cell.c1_cache, cell.c2_cache, T(pos), meta["c1_table"], meta["c2_table"],
                                     cell.select_meta).astype(self.ms.bool_)
        else:
            sel = cell.select(T(q), T(pos), meta["c1_table"], meta["c2_table"], scale)
        if cell.kernel is not None:
            out = cell.kernel(T(q), self.k_cache, self.v_cache, T(pos), T(table), sel.astype(self.ms.int32),
                              cell.kernel_meta)
        else:
            out = cell.attend(T(q), self.k_cache, self.v_cache, T(pos), T(table), 16, scale, sel)
        self.cached = total
        return out.asnumpy().reshape(width, HQ, D)[:n], sel.asnumpy()[0, :, :n]

    def reference(self, n: int):
        total = self.cached
        return ref.attention(self.q[total - n:total], self.k[:total], self.v[:total], self.cfg)


def ref_mask(selected, cfg, positions, nb):
    """The reference's index lists as the union mask the cell returns (June: plus the window)."""
    mask = np.zeros((len(selected), len(positions), nb), bool)
    nl = cfg.window_size // cfg.block_size
    for h, rows in enumerate(selected):
        for i, idx in enumerate(rows):
            mask[h, i, idx] = True
            if cfg.variant == "june2025":
                qb = positions[i] // 64
                mask[h, i, max(qb - nl + 1, 0): qb + 1] = True
    return mask


def check_steps(cfg, chunks, seed=0, kernel=False, head_dim=D):
    h = Harness(cfg, seed, kernel=kernel, head_dim=head_dim)
    for n in chunks:
        out, sel = h.step(n)
        want, want_sel = h.reference(n)
        np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-4)
        if want_sel is not None:
            positions = np.arange(h.cached - n, h.cached)
            mask = ref_mask(want_sel, cfg, positions, sel.shape[-1])
            bad = np.argwhere(mask != sel)
            assert not len(bad), f"selection differs at (head, query, block) {bad[:5].tolist()}, n={n}"


@pytest.mark.parametrize("variant", ["current", "june2025"])
def test_prefill_then_decode_matches_reference(variant):
    # One 320-token prefill (5 blocks), then decode across 336, 383, 384 and 385 (C1 every 16,
    # C2 every 64, a new 64-token block and the window edge moving).
    check_steps(sparse_cfg(variant=variant), [320] + [1] * 70)


@pytest.mark.parametrize("variant", ["current", "june2025"])
def test_chunked_prefill_matches_reference(variant):
    # Chunk ends off every boundary: 31, 32, 33 (first C1), 127/128 (first C2), 190..260, 447.
    check_steps(sparse_cfg(variant=variant, topk=2), [31, 1, 1, 94, 1, 62, 1, 64, 6, 187, 1])


def test_dense_below_dense_len_then_sparse():
    cfg = sparse_cfg(dense_len=200)
    h = Harness(cfg, seed=1)
    out, sel = h.step(150)  # dense: every past block
    np.testing.assert_allclose(out, h.reference(150)[0], atol=2e-5, rtol=1e-4)
    assert sel[:, -1, :3].all()
    check_steps(cfg, [199, 1, 1, 60])  # 199 dense, 200 and on sparse


def test_dense_len_boundary_is_sparse():
    """A call of exactly dense_len tokens is sparse. The window and top-k are narrow enough that
    sparse attention at 200 tokens drops a block (with a wider choice it equals dense there)."""
    check_steps(sparse_cfg(dense_len=200, window_size=64, topk=2), [199, 1, 1])


def test_query_without_a_visible_c2_entry_scores_nothing():
    """Queries before token 127 see no coarse kernel: all their relevances are 0 ("current").
    With no initial block and no window only the query's own block is forced in, so a rule that
    scored such queries anyway would pick block 0 over it (ties go to the lower index)."""
    check_steps(sparse_cfg(init_blocks=0, window_size=0, topk=1), [100, 1, 1, 40])


def test_topk_covering_everything_is_dense():
    cfg = sparse_cfg(topk=64)
    h = Harness(cfg, seed=2)
    for n in (300, 1, 40):
        out, _ = h.step(n)
        dense = ref.attention(h.q[h.cached - n:h.cached], h.k[:h.cached], h.v[:h.cached],
                              replace(cfg, dense_len=10**6))[0]
        np.testing.assert_allclose(out, dense, atol=2e-5, rtol=1e-4)


def test_incremental_c1_c2_equal_recomputed():
    h = Harness(sparse_cfg(), seed=3)
    for n in (100, 1, 1, 29, 200, 1):
        h.step(n)
    c1 = ref.compress(h.k[:h.cached], 32, 16)
    c2 = ref.compress(h.k[:h.cached], 128, 64)
    stored1 = h.cell.c1_cache.asnumpy()[h.blocks[1:len(c1) + 1]]
    stored2 = h.cell.c2_cache.asnumpy()[h.blocks[7:4 * len(c2) + 4:4]]
    np.testing.assert_allclose(stored1, c1, atol=1e-6)
    np.testing.assert_allclose(stored2, c2, atol=1e-6)


@pytest.mark.parametrize("variant", ["current", "june2025"])
def test_cpu_kernel_matches_reference(variant):
    from mindcpm.ops.infllm import block_sparse_attention_kernel
    if block_sparse_attention_kernel() is None:
        pytest.skip("no C++ compiler for the CPU kernels")
    check_steps(sparse_cfg(variant=variant), [31, 1, 96, 1, 200, 1, 1, 60], kernel=True)
    check_steps(sparse_cfg(variant=variant, dense_len=300), [299, 1, 1], kernel=True)
    check_steps(sparse_cfg(variant=variant, dense_len=200, window_size=64, topk=2), [199, 1, 1], kernel=True)
    if variant == "current":  # the visible-C2 rule is the LSE normaliser's ("june2025" has a window >= 1 block)
        check_steps(sparse_cfg(init_blocks=0, window_size=0, topk=1), [100, 1, 1, 40], kernel=True)
    check_steps(sparse_cfg(variant=variant), [200, 1, 150], kernel=True, head_dim=128)  # the AVX2 paths
