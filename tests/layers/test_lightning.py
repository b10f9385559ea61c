"""MiniMax lightning attention (mindcpm/layers/lightning.py over ops/lightning.py) against the float64
NumPy reference written from the published maths (tests/reference/minimax_numpy.py, docs/minimax.md)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.reference import minimax_numpy as R


def _t(a, dtype=None):
    import mindspore as ms
    return ms.Tensor(np.asarray(a), dtype)


def _silu_inputs(rng, h, t, d):
    return [R.silu(rng.standard_normal((h, t, d))) for _ in range(3)]


def _run_core(q, k, v, s, positions, pool, slot=0, block=256):
    """NativeLightning on one row: q, k, v [H, T, D] float64 -> (o [H, T, D], state after)."""
    import mindspore as ms
    from mindcpm.ops.lightning import NativeLightning
    h, t, d = q.shape
    args = [_t(x.transpose(1, 0, 2)[None], ms.float32) for x in (q, k, v)]
    o = NativeLightning()(*args, _t(s, ms.float32), pool, _t([slot], ms.int32),
                          _t(np.asarray(positions, np.int32)[None]), block)
    return o.asnumpy().reshape(t, h, d).transpose(1, 0, 2), pool.asnumpy()[slot]


def _pool(h, d, slots=2):
    import mindspore as ms
    return ms.Parameter(_t(np.zeros((slots, h, d, d)), ms.float32), name="pool", requires_grad=False)


# -- 1. slopes ------------------------------------------------------------------------------------
# ALiBi's head slopes as published (Press et al. 2022, "Train Short, Test Long", section 3 and
# the authors' get_slopes in ofirpress/attention_with_linear_biases, which MiniMax's remote code
# reuses): n = 2^k heads take 2^(-8/n), 2^(-16/n), ..., 2^-8; otherwise the slopes of the nearest
# smaller power of two c, then every other slope of 2c heads. Written out as numbers here.
PUBLISHED_SLOPES = {
    1: [2 ** -8],
    2: [2 ** -4, 2 ** -8],
    4: [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8],
    8: [2 ** -1, 2 ** -2, 2 ** -3, 2 ** -4, 2 ** -5, 2 ** -6, 2 ** -7, 2 ** -8],
    6: [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3],
    12: [2 ** -1, 2 ** -2, 2 ** -3, 2 ** -4, 2 ** -5, 2 ** -6, 2 ** -7, 2 ** -8,
         2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5],
    16: [2 ** -(e / 2) for e in range(1, 17)],
    48: [2 ** -(e / 4) for e in range(1, 33)] + [2 ** -(e / 8) for e in range(1, 32, 2)],
}


@pytest.mark.parametrize("h", sorted(PUBLISHED_SLOPES))
def test_base_slopes_are_the_published_alibi_slopes(h):
    from mindcpm.layers.lightning import base_slopes
    np.testing.assert_allclose(base_slopes(h), PUBLISHED_SLOPES[h], rtol=1e-6)
    np.testing.assert_allclose(R.base_slopes(h), PUBLISHED_SLOPES[h], rtol=1e-12)  # the reference's too


def test_slopes_power_of_two_non_power_of_two_and_layer_factor():
    from mindcpm.layers.lightning import base_slopes, lightning_slopes
    np.testing.assert_allclose(base_slopes(64)[[0, 63]], [0.917004, 0.00390625], rtol=1e-6)  # M1: 64 heads
    np.testing.assert_allclose(base_slopes(48)[:4], [0.8409, 0.7071, 0.5946, 0.5], atol=1e-4)
    # The remote code's layer factor 1 - l/(L-1) + 1e-5 (L = 80, as in M1).
    np.testing.assert_allclose(lightning_slopes(64, 0, 80) / base_slopes(64), 1.00001, rtol=1e-6)
    np.testing.assert_allclose(lightning_slopes(64, 78, 80) / base_slopes(64), 0.0126682, rtol=1e-5)
    np.testing.assert_allclose(lightning_slopes(64, 78, 80)[63], 4.95e-5, rtol=1e-2)
    assert lightning_slopes(48, 3, 8).dtype == np.float32


def _mixed_slopes():
    """Four heads whose rates come from layers 0, 40 and 78 of M1 (docs/minimax.md#decay-slopes), down to ~5e-5."""
    return np.array([R.layer_slopes(64, 0, 80)[0], R.layer_slopes(64, 40, 80)[20],
                     R.layer_slopes(64, 78, 80)[8], R.layer_slopes(64, 78, 80)[63]])


# -- 2. block form == recurrence; chunked == one-shot; prefill + decode == one-shot ----------------
@pytest.mark.parametrize("t", [1, 7, 255, 256, 257, 1000])
@pytest.mark.parametrize("d", [16, 128])
def test_block_form_equals_recurrence(t, d):
    if d == 128 and t == 1000:
        pytest.skip("covered by d=16; the float64 recurrence at d=128 takes long on a loaded machine")
    rng = np.random.default_rng(t + d)
    q, k, v = _silu_inputs(rng, 4, t, d)
    s = _mixed_slopes()
    ref_o, ref_s = R.recurrence(q, k, v, s)
    o, state = _run_core(q, k, v, s, np.arange(t), _pool(4, d))
    scale = np.abs(ref_o).max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(o / scale, ref_o / scale, atol=2e-5)
    np.testing.assert_allclose(state / np.abs(ref_s).max(), ref_s / np.abs(ref_s).max(), atol=2e-5)


def test_reference_block_form_is_exact_for_any_block():
    rng = np.random.default_rng(0)
    q, k, v = _silu_inputs(rng, 4, 300, 8)
    s = _mixed_slopes()
    o, st = R.recurrence(q, k, v, s)
    for block in (1, 64, 256):
        ob, sb = R.block_form(q, k, v, s, block=block)
        np.testing.assert_allclose(ob, o, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(sb, st, rtol=1e-10, atol=1e-10)


def test_chunked_prefill_and_decode_continue_the_state():
    rng = np.random.default_rng(3)
    t, d, split, n = 400, 16, 333, 390
    q, k, v = _silu_inputs(rng, 4, t, d)
    s = _mixed_slopes()
    ref_o, ref_s = R.recurrence(q, k, v, s)
    scale = np.abs(ref_o).max()
    # Chunked at an unaligned split, blocks of 64: the second chunk starts from the cached state.
    pool = _pool(4, d)
    o1, _ = _run_core(q[:, :split], k[:, :split], v[:, :split], s, np.arange(split), pool, block=64)
    o2, state = _run_core(q[:, split:], k[:, split:], v[:, split:], s, np.arange(split, t), pool, block=64)
    np.testing.assert_allclose(np.concatenate([o1, o2], 1) / scale, ref_o / scale, atol=2e-5)
    np.testing.assert_allclose(state / np.abs(ref_s).max(), ref_s / np.abs(ref_s).max(), atol=2e-5)
    # Prefill n tokens, then decode the rest one at a time (update before read).
    pool = _pool(4, d)
    outs = [_run_core(q[:, :n], k[:, :n], v[:, :n], s, np.arange(n), pool, slot=1)[0]]
    for i in range(n, t):
        outs.append(_run_core(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], s, [i], pool, slot=1)[0])
    np.testing.assert_allclose(np.concatenate(outs, 1) / scale, ref_o / scale, atol=2e-5)


def test_padding_keeps_the_state_and_position_zero_starts_fresh():
    rng = np.random.default_rng(4)
    t, d = 20, 8
    q, k, v = _silu_inputs(rng, 4, t, d)
    s = _mixed_slopes()
    ref_o, ref_s = R.recurrence(q[:, :13], k[:, :13], v[:, :13], s)
    pool = _pool(4, d)
    pool.set_data(_t(np.full((2, 4, d, d), 7.0), pool.dtype))  # stale state of a finished sequence
    positions = list(range(13)) + [-1] * 7  # a row padded on the right
    o, state = _run_core(q, k, v, s, positions, pool)
    np.testing.assert_allclose(o[:, :13], ref_o, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state, ref_s, rtol=1e-4, atol=1e-5)


# -- 3. precision guards --------------------------------------------------------------------------
def test_slopes_state_and_router_stay_fp32_in_a_bf16_layer():
    import mindspore as ms
    from mindcpm.layers.lightning import LightningAttention
    from mindcpm.layers.moe import MoE
    from mindcpm.ops.lightning import NativeLightning
    from mindcpm.ops.moe import NativeMoE
    layer = LightningAttention(32, 2, 16, 78, 80, 256, 1e-6, NativeLightning(), 3, ms.bfloat16)
    assert layer.slopes.dtype == ms.float32 and layer.state.dtype == ms.float32
    assert layer.norm.weight.dtype == ms.float32 and layer.qkv_proj.weight.dtype == ms.bfloat16
    moe = MoE(32, 16, 4, 2, NativeMoE(), ms.bfloat16)
    assert moe.gate.weight.dtype == ms.float32 and moe.experts.w13.weight.dtype == ms.bfloat16


def test_half_precision_inputs_still_decay_with_tiny_slope():
    """s = 5e-5: exp(-s) is 1.0 in bf16 and fp16 (docs/minimax.md#precision-rules). With fp16 q/k/v (bf16 does not
    compute on CPU) the core must still decay the state in fp32."""
    import mindspore as ms
    from mindcpm.ops.lightning import NativeLightning
    h, d, t = 1, 4, 64
    s = np.array([5e-5])
    pool = _pool(h, d)
    state0 = np.ones((2, h, d, d))
    pool.set_data(_t(state0, ms.float32))
    zeros = _t(np.zeros((1, t, h, d)), ms.float16)
    NativeLightning()(zeros, zeros, zeros, _t(s, ms.float32), pool, _t([0], ms.int32),
                      _t(np.arange(5, 5 + t, dtype=np.int32)[None]), 16)
    got = pool.asnumpy()[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.exp(-5e-5 * t), rtol=1e-6)
    assert got.max() < 1.0


# -- 4./5. the lightning layer: head-major qkv, SiLU, norm over H*D (eps 1e-6), gate on the input ---
# (the norm cell itself: tests/layers/test_norm.py)
def _lightning_weights(rng, hidden, h, d):
    return {"self_attn.qkv_proj.weight": rng.standard_normal((3 * h * d, hidden)) * 0.1,
            "self_attn.output_gate.weight": rng.standard_normal((h * d, hidden)) * 0.1,
            "self_attn.norm.weight": 1 + rng.standard_normal(h * d) * 0.1,
            "self_attn.out_proj.weight": rng.standard_normal((hidden, h * d)) * 0.1}


def _lightning_layer(weights, hidden, h, d, layer, num_layers):
    import mindspore as ms
    from mindcpm.layers.lightning import LightningAttention
    from mindcpm.ops.lightning import NativeLightning
    cell = LightningAttention(hidden, h, d, layer, num_layers, 256, 1e-6, NativeLightning(), 2)
    for name, p in cell.parameters_and_names():
        key = "self_attn." + name
        if key in weights:
            p.set_data(_t(weights[key], ms.float32))
    return cell


@pytest.mark.parametrize("h", [4, 6])
def test_lightning_layer_matches_reference(h):
    import mindspore as ms
    rng = np.random.default_rng(h)
    hidden, d, t, layer, layers = 48, 8, 30, 2, 8
    w = _lightning_weights(rng, hidden, h, d)
    x = rng.standard_normal((t, hidden))
    cfg = type("C", (), dict(heads=h, head_dim=d, layers=layers))
    ref, _ = R.lightning_layer(cfg, {f"model.layers.{layer}." + k: v for k, v in w.items()},
                               f"model.layers.{layer}.", x, None)
    cell = _lightning_layer(w, hidden, h, d, layer, layers)
    out = cell(_t(x[None], ms.float32), _t(np.arange(t, dtype=np.int32)[None]), _t([0], ms.int32)).asnumpy()[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    # The test can tell a [Q; K; V] split and a per-head norm from the documented layout and norm (docs/minimax.md).
    swapped = dict(w)
    qkv = w["self_attn.qkv_proj.weight"].reshape(3, h, d, hidden)  # read as [Q; K; V] ...
    swapped["self_attn.qkv_proj.weight"] = qkv.transpose(1, 0, 2, 3).reshape(3 * h * d, hidden)  # ... as head-major
    wrong, _ = R.lightning_layer(cfg, {f"model.layers.{layer}." + k: v for k, v in swapped.items()},
                                 f"model.layers.{layer}.", x, None)
    assert np.abs(wrong - ref).max() > 1e-2
