"""The four AscendC ops (mindcpm/ops/ascendc.py) against mindcpm's MindSpore composites, which
are the fallback and the reference: the same 16-bit-rounded inputs go to the custom op (in its
16-bit dtype) and to the composite (in fp32), for scripts/validate_ascend.py.

  LightningDecode   rows continuing a cached state, starting fresh over a stale one, padding
  LightningPrefill  a 300-token chunk continuing a state (past the 256-token block) and a
                    150-token row from position 0 with trailing padding; o and the new states
  InfllmBlockSelect both variants, a 16-query chunk of a 700-token row (past dense_len) and of a
                    100-token row (dense), scrambled page tables: the selected blocks, exactly
  InfllmSparseAttention  the composite's selection of those rows: the output

Tolerances: the custom ops widen the 16-bit inputs to fp32 and keep fp32 states and
accumulators, like the composites here, so they differ by fp32 summation order (1e-4 of the
output's scale), and InfLLM attention by its final rounding to the 16-bit dtype (2 ulps).
"""
from __future__ import annotations

import numpy as np

from scripts.ascend_op_cases import ULP, round_to

HQ, HKV, D, PAGE = 4, 2, 64, 16
FP32_TOL = 1e-4


def _ms_dtype(dtype: str):
    import mindspore as ms
    return {"float16": ms.float16, "bfloat16": ms.bfloat16}[dtype]


def _rounded(rng, shape, dtype: str, scale=1.0) -> np.ndarray:
    return round_to(rng.standard_normal(shape) * scale, dtype)


def _relative(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def _lightning_inputs(rng, dtype, b, l, h=4, slots=4):
    """q, k, v as the layer feeds them (SiLU outputs), slopes of M1's rule, a stale state pool."""
    q, k, v = (round_to(x / (1 + np.exp(-x)), dtype) for x in rng.standard_normal((3, b, l, h, D)))
    slopes = (2.0 ** (-8.0 * np.arange(1, h + 1) / h)).astype(np.float32)
    pool = rng.standard_normal((slots, h, D, D)).astype(np.float32)
    return q, k, v, slopes, pool


def _lightning(dtype: str, positions: np.ndarray, slots: list[int]) -> tuple[bool, str]:
    import mindspore as ms
    from mindcpm.ops.ascendc import AscendCLightning
    from mindcpm.ops.lightning import NativeLightning
    rng = np.random.default_rng(len(slots) + positions.shape[1])
    b, l = positions.shape
    q, k, v, slopes, pool = _lightning_inputs(rng, dtype, b, l)
    outs, states = [], []
    for cell, act in ((AscendCLightning(_ms_dtype(dtype)), _ms_dtype(dtype)), (NativeLightning(), ms.float32)):
        state = ms.Parameter(ms.Tensor(pool.copy()), name="state", requires_grad=False)
        o = cell(*(ms.Tensor(x, act) for x in (q, k, v)), ms.Tensor(slopes), state,
                 ms.Tensor(np.array(slots, np.int32)), ms.Tensor(positions.astype(np.int32)), 256)
        outs.append(o.asnumpy())
        states.append(state.asnumpy())
    owned = [s for s, p in zip(slots, positions[:, 0]) if p >= 0]
    real = (positions >= 0).reshape(b, l, 1)  # what padding tokens output is never read
    err = max(_relative(outs[0].reshape(b, l, -1) * real, outs[1].reshape(b, l, -1) * real),
              _relative(states[0][owned], states[1][owned]))
    return err <= FP32_TOL, f"o and states: max difference {err:.2g} of their scale (tolerance {FP32_TOL:g})"


def lightning_decode(dtype: str):
    # Rows: slot 0 continues at position 40, slot 1 starts fresh over a stale state, a padding row.
    return _lightning(dtype, np.array([[40], [0], [-1]]), [0, 1, 3])


def lightning_prefill(dtype: str):
    positions = np.full((2, 300), -1)
    positions[0] = np.arange(40, 340)
    positions[1, :150] = np.arange(150)
    return _lightning(dtype, positions, [0, 1])


class _SparseRows:
    """Two rows (700 and 100 tokens) in a paged cache with scrambled tables, their last 16
    tokens as the queries, and C1/C2 entries where mindcpm/layers/sparse.py keeps them."""

    def __init__(self, dtype: str, totals=(700, 100), lq=16):
        rng = np.random.default_rng(sum(totals))
        width = 64  # pages per table (a power of two past 700 / 16)
        self.pages = 2 * width + 1
        self.pad = self.pages - 1
        order = rng.permutation(self.pages - 1)
        self.tables = np.full((2, width), self.pad, np.int32)
        used = 0
        for i, t in enumerate(totals):
            n = -(-t // PAGE)
            self.tables[i, :n] = order[used:used + n]
            used += n
        self.positions = np.stack([np.arange(t - lq, t) for t in totals]).astype(np.int32)
        self.q = _rounded(rng, (2, lq, HQ, D), dtype)
        self.k = _rounded(rng, (self.pages * PAGE, HKV, D), dtype)
        self.v = _rounded(rng, (self.pages * PAGE, HKV, D), dtype)
        self.c1 = _rounded(rng, (self.pages, HKV, D), dtype, 0.5)
        self.c2 = _rounded(rng, (self.pages, HKV, D), dtype, 0.5)
        self.c1_table = np.ascontiguousarray(self.tables[:, 1:])
        self.c2_table = np.ascontiguousarray(self.tables[:, 7::4])


def _sparse_layer(variant: str, dtype, ascendc: bool):
    from mindcpm.config import SparseConfig
    from mindcpm.layers.sparse import InfLLMv2Attention
    cfg = SparseConfig(window_size=128, topk=4, dense_len=256, variant=variant)
    return InfLLMv2Attention(cfg, HQ, HKV, D, 1, dtype, use_kernel=False, ascendc=ascendc)


def _composite_selection(rows: _SparseRows, variant: str):
    import mindspore as ms
    layer = _sparse_layer(variant, ms.float32, False)
    layer.c1_cache = ms.Parameter(ms.Tensor(rows.c1), name="c1", requires_grad=False)
    layer.c2_cache = ms.Parameter(ms.Tensor(rows.c2), name="c2", requires_grad=False)
    return layer.select(ms.Tensor(rows.q), ms.Tensor(rows.positions), ms.Tensor(rows.c1_table),
                        ms.Tensor(rows.c2_table), 1.0 / np.sqrt(D)).asnumpy()


def infllm_block_select(dtype: str):
    import mindspore as ms
    rows, act = _SparseRows(dtype), _ms_dtype(dtype)
    details = []
    for variant in ("current", "june2025"):
        want = _composite_selection(rows, variant)
        got = _sparse_layer(variant, act, True).ascendc_select(
            ms.Tensor(rows.q, act), ms.Tensor(rows.c1, act), ms.Tensor(rows.c2, act), ms.Tensor(rows.positions),
            ms.Tensor(rows.c1_table), ms.Tensor(rows.c2_table)).asnumpy()
        wrong = int(((got != 0) != want).sum())
        details.append(f"{variant}: {wrong} of {want.size} block choices differ")
        if wrong:
            return False, "; ".join(details)
    return True, "; ".join(details)


def infllm_sparse_attention(dtype: str):
    import mindspore as ms
    rows, act = _SparseRows(dtype), _ms_dtype(dtype)
    selected = _composite_selection(rows, "current")
    composite = _sparse_layer("current", ms.float32, False)
    want = composite.attend(ms.Tensor(rows.q), ms.Tensor(rows.k), ms.Tensor(rows.v), ms.Tensor(rows.positions),
                            ms.Tensor(rows.tables), PAGE, 1.0 / np.sqrt(D), ms.Tensor(selected)).asnumpy()
    got = _sparse_layer("current", act, True).ascendc_attend(
        ms.Tensor(rows.q, act), ms.Tensor(rows.k, act), ms.Tensor(rows.v, act), ms.Tensor(rows.positions),
        ms.Tensor(rows.tables), ms.Tensor(selected.astype(np.int32))).astype(ms.float32).asnumpy()
    err, tol = _relative(got, want), 2 * ULP[dtype]
    return err <= tol, f"max difference {err:.2g} of the output's scale (tolerance {tol:.2g})"


CHECKS = {"LightningDecode": lightning_decode, "LightningPrefill": lightning_prefill,
          "InfllmBlockSelect": infllm_block_select, "InfllmSparseAttention": infllm_sparse_attention}
