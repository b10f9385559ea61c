"""The AscendC InfLLM-v2 kernels (kernels_aclnn/infllm_score/op_kernel: block selection;
kernels_aclnn/infllm_attention/op_kernel: block-sparse attention over the paged KV cache) run on
CPU through the emulated primitive layer, against the float64 reference written from the spec
(tests/reference/infllm_numpy.py), at the boundaries tests/layers/test_sparse.py uses.

The caches hold 16-bit values, so the reference is fed the same rounded q, K, V and the same
rounded compressed keys (the means are rounded once, as the cache stores them). Selection must
then match exactly (ties to the lower block index); the attention output is rounded to the
activation dtype once at the end, so its tolerance is half an ulp of that dtype (2^-11 fp16,
2^-8 bf16) relative, plus fp32 accumulation noise (1e-5 of the output's scale)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tests import ascendc_emu as emu
from tests.reference import infllm_numpy as ref
from tests.layers.test_sparse import ref_mask

HQ, HKV = 4, 2
PAGE = 16  # KV page (block) size; C1 entries sit in these pages
CORES = 3
RTOL = {emu.FP16: 2.0 ** -11, emu.BF16: 2.0 ** -8}


@pytest.fixture(scope="module")
def lib():
    return emu.library_or_skip()


def sparse_cfg(variant="current", dense_len=-1, topk=3):
    return SimpleNamespace(kernel_size=32, kernel_stride=16, block_size=64, window_size=128, init_blocks=1,
                           topk=topk, dense_len=dense_len, variant=variant)


class Paged:
    """One sequence of `total` tokens in a paged cache with a scrambled block table (its own row)
    and a padding row; compressed keys stored where mindcpm/layers/sparse.py stores them."""

    def __init__(self, total, dtype, d=16, seed=0):
        rng = np.random.default_rng(seed)
        self.dtype, self.d, self.total = dtype, d, total
        k = rng.normal(size=(total, HKV, d)) + rng.normal(size=(1, HKV, d))  # structured scores, ties
        self.bits = {"q": emu.to_bits(rng.normal(size=(total, HQ, d)), dtype), "k": emu.to_bits(k, dtype),
                     "v": emu.to_bits(rng.normal(size=(total, HKV, d)), dtype)}
        self.q, self.k, self.v = (emu.from_bits(self.bits[n], dtype) for n in ("q", "k", "v"))
        width = max(8, 1 << (-(-total // PAGE) - 1).bit_length())  # table width in pages, a power of two
        self.pad = width  # the spare page every unused table entry points at
        self.table = np.full((2, width), self.pad, np.int32)
        used = -(-total // PAGE)
        self.table[0, :used] = rng.permutation(width)[:used]
        slots = (width + 1) * PAGE
        self.k_cache = np.zeros((slots, HKV, d), np.uint16)
        self.v_cache = np.zeros((slots, HKV, d), np.uint16)
        tok = np.arange(total)
        at = self.table[0, tok // PAGE] * PAGE + tok % PAGE
        self.k_cache[at], self.v_cache[at] = self.bits["k"], self.bits["v"]
        self.c1 = np.zeros((width + 1, HKV, d), np.uint16)
        self.c2 = np.zeros((width + 1, HKV, d), np.uint16)
        c1, c2 = self.stored(self.k, 32, 16), self.stored(self.k, 128, 64)
        self.c1[self.table[0, 1:len(c1) + 1]] = emu.to_bits(c1, dtype)
        self.c2[self.table[0, 7:4 * len(c2) + 7:4]] = emu.to_bits(c2, dtype)
        self.c1_table = np.ascontiguousarray(self.table[:, 1:])
        self.c2_table = np.ascontiguousarray(self.table[:, 7::4])

    def stored(self, k, kernel, stride):
        """The compressed keys as the cache holds them: the mean, rounded to the dtype."""
        return emu.from_bits(emu.to_bits(_compress(k, kernel, stride), self.dtype), self.dtype)

    def chunk(self, lq, width):
        """The last lq tokens as a chunk of `width` queries; row 1 is all padding."""
        q = np.zeros((2, width, HQ, self.d), np.uint16)
        q[0, :lq] = self.bits["q"][self.total - lq:]
        pos = np.full((2, width), -1, np.int32)
        pos[0, :lq] = np.arange(self.total - lq, self.total)
        return q, pos


_compress = ref.compress


def select(lib, p: Paged, q, pos, cfg, n_cores=CORES):
    current = cfg.variant == "current"
    window = cfg.window_size // cfg.block_size
    meta = np.array([1 / np.sqrt(p.d), cfg.init_blocks, window, cfg.topk + window if current else cfg.topk,
                     cfg.dense_len, float(current), 16 // (HQ // HKV)], np.float32)
    return emu.infllm_block_select(lib, p.dtype, q, p.c1, p.c2, pos, p.c1_table, p.c2_table, meta, n_cores)


def expected_selection(p: Paged, lq, cfg, nb, monkeypatch):
    """The reference's mask [HKV, lq, nb] (dense rows: every past block)."""
    positions = np.arange(p.total - lq, p.total)
    if cfg.dense_len != -1 and p.total < cfg.dense_len:
        blocks = np.arange(nb)[None, None, :]
        return np.broadcast_to(blocks <= (positions // 64)[None, :, None], (HKV, lq, nb))
    monkeypatch.setattr(ref, "compress", p.stored)  # the reference sees the stored (rounded) means
    return ref_mask(ref.select_blocks(p.q[p.total - lq:], p.k, cfg), cfg, positions, nb)


# (total, queries, dense_len, topk): chunk ends around every boundary of the CPU tests: first C1
# (31..33), first C2 (127/128), 64-token blocks and the window edge (320, 336, 383..385, 447),
# dense_len (199/200/201); small top-k so prefill chunks are sparse too.
CASES = [(33, 3, -1, 1), (128, 95, -1, 1), (260, 70, -1, 1), (320, 320, -1, 1), (336, 1, -1, 3), (383, 1, -1, 3),
         (384, 1, -1, 3), (385, 1, -1, 3), (447, 1, -1, 3), (700, 40, -1, 2), (199, 1, 200, 3), (200, 1, 200, 3),
         (201, 2, 200, 3)]


@pytest.mark.parametrize("variant", ["current", "june2025"])
@pytest.mark.parametrize("dtype", [emu.FP16, emu.BF16])
def test_selection_matches_reference(lib, variant, dtype, monkeypatch):
    for n, (total, lq, dense_len, topk) in enumerate(CASES):
        cfg = sparse_cfg(variant, dense_len, topk)
        p = Paged(total, dtype, seed=n)
        width = max(1, 1 << (lq - 1).bit_length())
        q, pos = p.chunk(lq, width)
        got = select(lib, p, q, pos, cfg)
        want = expected_selection(p, lq, cfg, got.shape[-1], monkeypatch)
        monkeypatch.undo()
        bad = np.argwhere(got[0, :, :lq].astype(bool) != want)
        assert not len(bad), f"total {total}: selection differs at (head, query, block) {bad[:5].tolist()}"
        assert not got[0, :, lq:].any() and not got[1].any()  # padding selects nothing


def attend(lib, p: Paged, q, pos, selected, n_cores=CORES):
    out = emu.infllm_sparse_attention(lib, p.dtype, q, p.k_cache, p.v_cache, pos, p.table, selected,
                                      1 / np.sqrt(p.d), PAGE, n_cores)
    return emu.from_bits(out, p.dtype).reshape(q.shape)


def check_attention(lib, variant, dtype, cases, monkeypatch, d=16, n_cores=CORES):
    """Selection then attention through the emulation, against the reference's output."""
    for n, (total, lq, dense_len, topk) in enumerate(cases):
        cfg = sparse_cfg(variant, dense_len, topk)
        p = Paged(total, dtype, d=d, seed=n)
        q, pos = p.chunk(lq, max(1, 1 << (lq - 1).bit_length()))
        got = attend(lib, p, q, pos, select(lib, p, q, pos, cfg), n_cores)
        monkeypatch.setattr(ref, "compress", p.stored)
        want, _ = ref.attention(p.q[total - lq:], p.k, p.v, cfg)
        monkeypatch.undo()
        scale = np.abs(want).max()
        np.testing.assert_allclose(got[0, :lq], want, rtol=RTOL[dtype], atol=1e-5 * scale,
                                   err_msg=f"total {total}, queries {lq}")
        assert not got[0, lq:].any() and not got[1].any()  # padding outputs zeros


@pytest.mark.parametrize("variant", ["current", "june2025"])
@pytest.mark.parametrize("dtype", [emu.FP16, emu.BF16])
def test_attention_matches_reference(lib, variant, dtype, monkeypatch):
    check_attention(lib, variant, dtype, CASES, monkeypatch)


def test_attention_head_dim_128(lib, monkeypatch):
    check_attention(lib, "current", emu.BF16, [(447, 1, -1, 3), (260, 70, -1, 1)], monkeypatch, d=128)


def test_attention_splits_a_group_over_idle_cores(lib, monkeypatch):
    # 48 cores for 4 (row, KV head, query) triples: each query head gets its own unit.
    check_attention(lib, "current", emu.FP16, [(447, 1, -1, 3), (385, 1, -1, 3)], monkeypatch, n_cores=48)


# -- mutations: a bug injected at build time must fail the comparison ------------------------------------
@pytest.mark.parametrize("macro", ["MUTATE_PAGE_INDEX", "MUTATE_MISSING_RESCALE"])
def test_attention_mutations_are_caught(lib, macro, monkeypatch):
    mutated = emu.emu_library(macro, part="infllm")
    with pytest.raises((AssertionError, emu.EmuError)):
        check_attention(mutated, "current", emu.FP16, [(700, 40, -1, 2), (447, 1, -1, 3)], monkeypatch)
