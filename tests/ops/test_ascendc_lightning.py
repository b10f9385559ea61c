"""The AscendC lightning-attention kernels (kernels_aclnn/lightning_attention/op_kernel) run on CPU
through the emulated primitive layer, against the float64 recurrence written from the spec
(tests/reference/minimax_numpy.py), plus the tiling grid, the emulation's rounding and rules,
and builds with an injected bug that must fail.

Tolerances: the kernels widen q/k/v to fp32 on load and keep decays, states and outputs fp32,
and the reference is fed the same 16-bit-rounded inputs, so the only difference is fp32
arithmetic over at most a few hundred terms of SiLU-sized values: 2e-5 of the output's scale
(about 170 fp32 ulps), the bound tests/layers/test_lightning.py uses for the composite."""
from __future__ import annotations

import numpy as np
import pytest

from tests import ascendc_emu as emu
from tests.reference import minimax_numpy as R

TOL = 2e-5
CORES = 3  # an odd core count, so units split unevenly


@pytest.fixture(scope="module")
def lib():
    return emu.library_or_skip()


def _slopes():
    """Four heads with M1's decay rates from layers 0, 40 and 78 (down to ~5e-5)."""
    return np.array([R.layer_slopes(64, 0, 80)[0], R.layer_slopes(64, 40, 80)[20],
                     R.layer_slopes(64, 78, 80)[8], R.layer_slopes(64, 78, 80)[63]], np.float32)


def _inputs(rng, shape, dtype):
    """SiLU-distributed activations as 16-bit patterns and their exact float64 values."""
    bits = [emu.to_bits(R.silu(rng.standard_normal(shape)), dtype) for _ in range(3)]
    return bits, [emu.from_bits(b, dtype) for b in bits]


def _close(got, want):
    scale = max(np.abs(want).max(), 1e-30)
    np.testing.assert_allclose(got / scale, want / scale, atol=TOL)


def decode(lib, dtype, q, k, v, slopes, pool, slots, positions):
    """One decode step of rows [B] (q/k/v bits [B, H, D]); updates pool in place; returns o [B, H, D]."""
    return emu.lightning_decode(lib, dtype, q, k, v, slopes, pool, slots, positions, CORES).reshape(q.shape)


def prefill(lib, dtype, q, k, v, slopes, pool, slots, positions):
    """A prefill chunk of rows [B, L] (q/k/v bits [B, L, H, D]); returns o [B, L, H, D]."""
    return emu.lightning_prefill(lib, dtype, q, k, v, slopes, pool, slots, positions, CORES).reshape(q.shape)


# -- tiling and emulation -----------------------------------------------------------------------
def test_tiling_grid_fits_the_910b_and_covers_every_output(lib):
    import ctypes
    err = ctypes.create_string_buffer(512)
    lib.TilingGridCheck.restype = ctypes.c_int64
    shapes = lib.TilingGridCheck(err, ctypes.c_int64(512))
    assert shapes > 0, err.value.decode()


def test_emulated_casts_round_like_numpy_and_torch(lib):
    import ctypes
    import torch
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(4000) * 10.0 ** rng.integers(-9, 5, 4000),
                        [0.5 + 2 ** -12, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 2 ** -24, 3 * 2 ** -25, 2 ** -26,
                         1 + 2 ** -8, 1 + 3 * 2 ** -8, -0.0, 65504.0]]).astype(np.float32)
    for dtype, want in ((emu.FP16, x.astype(np.float16).view(np.uint16)),
                        (emu.BF16, torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))):
        got = np.zeros(len(x), np.uint16)
        lib.NarrowEmu(ctypes.c_int64(dtype), x.ctypes.data_as(ctypes.c_void_p), got.ctypes.data_as(ctypes.c_void_p),
                      ctypes.c_int64(len(x)))
        np.testing.assert_array_equal(got, want)
    # Past the fp16 range the device's Cast saturates (its doc), where numpy gives inf.
    big = np.array([70000.0, -1e6], np.float32)
    got = np.zeros(2, np.uint16)
    lib.NarrowEmu(ctypes.c_int64(emu.FP16), big.ctypes.data_as(ctypes.c_void_p), got.ctypes.data_as(ctypes.c_void_p),
                  ctypes.c_int64(2))
    assert got.tolist() == [0x7BFF, 0xFBFF]


def test_tiling_refuses_an_unaligned_head_dim(lib):
    rng = np.random.default_rng(0)
    (q, k, v), _ = _inputs(rng, (1, 4, 24), emu.FP16)
    with pytest.raises(emu.EmuError, match="multiple of 16"):
        decode(lib, emu.FP16, q, k, v, _slopes(), np.zeros((1, 4, 24, 24), np.float32), [0], [5])


# -- decode ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [emu.FP16, emu.BF16])
@pytest.mark.parametrize("d", [64, 128])
def test_decode_matches_recurrence(lib, dtype, d):
    rng = np.random.default_rng(d + dtype)
    h, slopes = 4, _slopes()
    (q, k, v), (qf, kf, vf) = _inputs(rng, (4, h, d), dtype)
    pool = (rng.standard_normal((5, h, d, d)) * 3).astype(np.float32)
    before = pool.copy()
    # Rows: a cached sequence, a padding row, a sequence at position 0 (fresh state), another cached one.
    slots, positions = [3, -1, 1, 0], [17, -1, 0, 400]
    o = decode(lib, dtype, q, k, v, slopes, pool, slots, positions)
    for row, (slot, pos) in enumerate(zip(slots, positions)):
        if slot < 0:
            assert not o[row].any()
            continue
        start = np.zeros((h, d, d)) if pos == 0 else before[slot].astype(np.float64)
        want_o, want_s = R.recurrence(qf[row][:, None], kf[row][:, None], vf[row][:, None], slopes.astype(np.float64),
                                      start)
        _close(o[row], want_o[:, 0])
        _close(pool[slot], want_s)
    np.testing.assert_array_equal(pool[[2, 4]], before[[2, 4]])  # slots nobody owns are untouched


# -- prefill and the hand-off to decode ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [emu.FP16, emu.BF16])
@pytest.mark.parametrize("t, d", [(255, 64), (256, 64), (257, 64), (129, 128), (65, 128)])
def test_prefill_matches_recurrence_at_block_edges(lib, dtype, t, d):
    # Kernel blocks are 128 tokens at d=64 and 64 at d=128: lengths one short of, at and one past
    # the spec's 256-token block and the kernel's own.
    rng = np.random.default_rng(t + d + dtype)
    h, slopes = 4, _slopes()
    (q, k, v), (qf, kf, vf) = _inputs(rng, (1, t, h, d), dtype)
    pool = np.zeros((2, h, d, d), np.float32)
    o = prefill(lib, dtype, q, k, v, slopes, pool, [1], np.arange(t)[None])
    want_o, want_s = R.recurrence(*(x[0].transpose(1, 0, 2) for x in (qf, kf, vf)), slopes.astype(np.float64))
    _close(o[0].transpose(1, 0, 2), want_o)
    _close(pool[1], want_s)
    assert not pool[0].any()


@pytest.mark.parametrize("dtype", [emu.FP16, emu.BF16])
def test_chunked_prefill_with_padding_then_decode_continue_the_state(lib, dtype):
    rng = np.random.default_rng(7)
    h, d, t, split, slopes = 4, 64, 260, 133, _slopes()
    (q, k, v), (qf, kf, vf) = _inputs(rng, (t, h, d), dtype)
    want_o, want_s = R.recurrence(qf.transpose(1, 0, 2), kf.transpose(1, 0, 2), vf.transpose(1, 0, 2),
                                  slopes.astype(np.float64))
    pool = rng.standard_normal((3, h, d, d)).astype(np.float32)  # stale: position 0 must ignore it
    # Two prefill chunks in a batch of two rows: this sequence (slot 2) and a padding row; the second
    # chunk has trailing padding and continues from the cached state.
    width = 160

    def chunk(lo, hi):
        qs, ks, vs = (np.zeros((2, width, h, d), np.uint16) for _ in range(3))
        qs[0, :hi - lo], ks[0, :hi - lo], vs[0, :hi - lo] = q[lo:hi], k[lo:hi], v[lo:hi]
        pos = np.full((2, width), -1)
        pos[0, :hi - lo] = np.arange(lo, hi)
        o = prefill(lib, dtype, qs, ks, vs, slopes, pool, [2, -1], pos)
        assert not o[0, hi - lo:].any() and not o[1].any()
        return o[0, :hi - lo]

    outs = [chunk(0, split), chunk(split, t - 3)]
    for i in range(t - 3, t):  # then decode, one token at a time
        outs.append(decode(lib, dtype, q[i][None], k[i][None], v[i][None], slopes, pool, [2], [i]))
    _close(np.concatenate(outs).transpose(1, 0, 2), want_o)
    _close(pool[2], want_s)


# -- mutations: a bug injected at build time must fail the comparison ------------------------------------
def test_decay_exponent_off_by_one_is_caught(lib):
    mutated = emu.emu_library("MUTATE_DECAY_EXPONENT", part="lightning")
    with pytest.raises(AssertionError):
        test_decode_matches_recurrence(mutated, emu.BF16, 64)
    with pytest.raises(AssertionError):
        test_prefill_matches_recurrence_at_block_edges(mutated, emu.BF16, 257, 64)


def test_missing_pipe_flag_is_caught(lib):
    mutated = emu.emu_library("MUTATE_MISSING_SYNC", part="lightning")
    with pytest.raises(emu.EmuError, match="before its copy-in was waited for"):
        test_decode_matches_recurrence(mutated, emu.FP16, 64)
