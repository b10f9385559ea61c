"""MiniMax building blocks against the float64 NumPy reference written from the published maths
(tests/reference/minimax_numpy.py, docs/minimax.md)."""
from __future__ import annotations

import json


import numpy as np
import pytest

from tests.reference import minimax_numpy as R


@pytest.fixture(scope="module")
def minimax_runner(tmp_path_factory):
    """The tests' tiny MiniMax checkpoint loaded into a runner: (runner, config dict, float64 weights)."""
    import json
    from mindcpm.config import ModelConfig
    from mindcpm.engine.runner import ModelRunner, RunnerConfig
    from tests.tiny_minimax import make_tiny_minimax
    path = make_tiny_minimax(str(tmp_path_factory.mktemp("minimax")))
    runner = ModelRunner(ModelConfig.from_dir(path), RunnerConfig(8, 16, 2, 128), path, progress=False)
    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    return runner, cfg, R.load(f"{path}/model.safetensors")


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


def test_norm_is_over_all_heads_with_eps_1e6():
    import mindspore as ms
    from mindcpm.layers.norm import RMSNorm
    rng = np.random.default_rng(0)
    h, d = 4, 8
    # Heads of very different scales: a per-head norm would equalise them; one over H*D does not.
    o = rng.standard_normal((3, h, d)) * np.array([1e-3, 1, 10, 100])[None, :, None]
    y = o.reshape(3, h * d)
    cell = RMSNorm(h * d, 1e-6, ms.float32)
    got = cell(_t(y, ms.float32)).asnumpy()
    np.testing.assert_allclose(got, R.rmsnorm(y, 1.0, 1e-6), rtol=1e-5, atol=1e-8)
    per_head = R.rmsnorm(o, 1.0, 1e-6).reshape(3, h * d)
    assert np.abs(per_head - got).max() > 0.1


# -- 6. partial RoPE --------------------------------------------------------------------------------
def test_partial_rope_rotates_first_64_of_128_dims():
    import mindspore as ms
    from mindcpm.config import RopeConfig
    from mindcpm.layers.rotary import RotaryEmbedding
    rng = np.random.default_rng(0)
    rope = RotaryEmbedding(RopeConfig(128, 1e7, 4096, rotary_dim=64))
    positions = np.array([[0, 1, 7, 100, 4000]], np.int32)
    q = rng.standard_normal((1, 5, 3, 128))
    k = rng.standard_normal((1, 5, 2, 128))
    got_q, got_k = (x.asnumpy() for x in rope(_t(positions), _t(q, ms.float32), _t(k, ms.float32)))
    for got, x in ((got_q, q), (got_k, k)):
        ref = R.partial_rope(x[0], positions[0].astype(np.float64), 64, 1e7)
        np.testing.assert_allclose(got[0], ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(got[..., 64:], x[..., 64:].astype(np.float32))


def test_config_spellings_resolve_alike():
    from mindcpm.config import ConfigError, ModelConfig
    from tests.tiny_minimax import hf_native_spelling, minimax_config
    remote = minimax_config(heads=4, head_dim=64, attn_types=(0, 1, 0, 1))
    a, b = ModelConfig.from_hf(remote), ModelConfig.from_hf(hf_native_spelling(remote))
    assert a.minimax == b.minimax and a.rope == b.rope and a.rope.rotary_dim == 32
    assert a.minimax.lightning_layers == (True, False, True, False) and a.minimax.postnorm
    text01 = dict(remote, architectures=["MiniMaxText01ForCausalLM"])
    assert ModelConfig.from_hf(text01).minimax == a.minimax
    with pytest.raises(ConfigError, match="layer types"):
        ModelConfig.from_hf(dict(remote, attn_type_list=[0, 1]))
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ModelConfig.from_hf(dict(remote, num_experts_per_tok=9))


# -- 7. MoE vs a dense loop --------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 13])  # n * top_k <= experts takes the gather path, more the dense one
def test_moe_matches_dense_loop(n):
    import mindspore as ms
    from mindcpm.layers.moe import MoE
    from mindcpm.ops.moe import NativeMoE
    rng = np.random.default_rng(n)
    hidden, inter, e, k = 16, 8, 4, 2
    x = rng.standard_normal((n, hidden))
    w = {"model.layers.0.block_sparse_moe.gate.weight": rng.standard_normal((e, hidden))}
    for i in range(e):
        for name, shape in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
            w[f"model.layers.0.block_sparse_moe.experts.{i}.{name}.weight"] = rng.standard_normal(shape) * 0.3
    cfg = type("C", (), dict(top_k=k, shared=0))
    ref = R.moe(cfg, w, "model.layers.0.", x)
    cell = MoE(hidden, inter, e, k, NativeMoE())
    cell.gate.weight.set_data(_t(w["model.layers.0.block_sparse_moe.gate.weight"], ms.float32))
    p = "model.layers.0.block_sparse_moe.experts."
    cell.experts.w13.weight.set_data(_t(np.stack([np.concatenate([w[f"{p}{i}.w1.weight"], w[f"{p}{i}.w3.weight"]])
                                                  for i in range(e)]), ms.float32))
    cell.experts.w2.weight.set_data(_t(np.stack([w[f"{p}{i}.w2.weight"] for i in range(e)]), ms.float32))
    got = cell(_t(x[None], ms.float32)).asnumpy()[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


# -- 8. postnorm residual flow ------------------------------------------------------------------------
def test_postnorm_residual_flow(minimax_runner):
    """Zero the attention out-projection and the experts' down-projections: the layer must give
    alpha_mlp * RMSNorm_post(alpha_attn * RMSNorm_in(x)) (a pre-norm bug gives alpha_mlp*alpha_attn*x)."""
    import mindspore as ms
    runner, cfg, weights = minimax_runner
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, cfg["hidden_size"]))
    for i in (0, 3):  # a lightning layer and a softmax layer
        layer = runner.model.layers[i]
        attn_out = layer.self_attn.out_proj if i != 3 else layer.self_attn.o_proj
        saved = attn_out.weight.asnumpy(), layer.block_sparse_moe.experts.w2.weight.asnumpy()
        attn_out.weight.set_data(_t(np.zeros_like(saved[0]), ms.float32))
        layer.block_sparse_moe.experts.w2.weight.set_data(_t(np.zeros_like(saved[1]), ms.float32))
        try:
            out = layer(_t(x, ms.float32), _t(np.arange(5, dtype=np.int32)[None]),
                        _t(np.arange(5, dtype=np.int32) + 8), _t(np.array([[1, 2]], np.int32)),
                        _t([0], ms.int32), 8).asnumpy()
        finally:
            attn_out.weight.set_data(_t(saved[0], ms.float32))
            layer.block_sparse_moe.experts.w2.weight.set_data(_t(saved[1], ms.float32))
        p, alpha = f"model.layers.{i}.", cfg["layernorm_mlp_alpha"]
        h = R.rmsnorm(x, weights[p + "input_layernorm.weight"], 1e-5)
        expected = alpha * R.rmsnorm(alpha * h, weights[p + "post_attention_layernorm.weight"], 1e-5)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        assert not np.allclose(out, alpha * alpha * x, atol=1e-2)


def test_loader_names_and_clear_errors(tmp_path):
    """HF names (docs/minimax.md#weight-names) fill the stacked experts and fp32 router; bad expert tensors get the
    loader's one-line errors."""
    import mindspore as ms
    from safetensors.numpy import save_file
    from mindcpm.config import ModelConfig
    from mindcpm.loader import CheckpointError, load_checkpoint
    from mindcpm.models.minimax import MiniMaxForCausalLM
    from mindcpm.ops import Device
    from tests.tiny_minimax import make_tiny_minimax, minimax_config, random_weights
    cfg = minimax_config(hidden=32, heads=2, head_dim=16, kv_heads=1, attn_types=(0, 1), intermediate=8)
    path = make_tiny_minimax(str(tmp_path / "ok"), cfg)
    mc = ModelConfig.from_dir(path)

    def model(dtype=ms.float32):
        return MiniMaxForCausalLM(mc, Device(dtype=dtype, block_size=8, cache_blocks=3), 2)
    m = model(ms.float16)
    load_checkpoint(m, path, ms.float16, progress=False)
    weights = random_weights(cfg)
    moe = m.layers[0].block_sparse_moe
    assert moe.gate.weight.dtype == ms.float32 and moe.experts.w13.weight.dtype == ms.float16
    np.testing.assert_array_equal(moe.gate.weight.asnumpy(), weights["model.layers.0.block_sparse_moe.gate.weight"])
    p = "model.layers.0.block_sparse_moe.experts.3."
    np.testing.assert_array_equal(moe.experts.w13.weight.asnumpy()[3], np.concatenate(
        [weights[p + "w1.weight"], weights[p + "w3.weight"]]).astype(np.float16))
    np.testing.assert_array_equal(moe.experts.w2.weight.asnumpy()[3], weights[p + "w2.weight"].astype(np.float16))
    for name, change, message in (
            ("extra", {"model.layers.0.block_sparse_moe.experts.9.w1.weight": np.zeros((8, 32), np.float32)},
             "unexpected tensor model.layers.0.block_sparse_moe.experts.9.w1.weight"),
            ("missing", {p + "w3.weight": None}, "missing tensor for parameter layers.0.block_sparse_moe.experts.w13.weight"),
            ("shape", {p + "w2.weight": np.zeros((32, 9), np.float32)}, r"has shape \(32, 9\), expected \(32, 8\)")):
        bad = {k: v for k, v in weights.items()}
        for k, v in change.items():
            bad.pop(k, None)
            if v is not None:
                bad[k] = v
        d = tmp_path / name
        d.mkdir()
        save_file(bad, str(d / "model.safetensors"))
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(model(), str(d), progress=False)


def test_router_stays_fp32_with_16_bit_weights_on_cpu(tmp_path):
    """LLM(dtype="bfloat16") on CPU stores the matrices in bf16, but not the router (docs/minimax.md#precision-rules)."""
    import mindspore as ms
    from mindcpm.config import ModelConfig
    from mindcpm.models.minimax import MiniMaxForCausalLM
    from mindcpm.ops import Device
    from mindcpm.ops.cpu_kernels import kernels_available
    from tests.tiny_minimax import minimax_config
    if not kernels_available():
        pytest.skip("16-bit weights on CPU need the CPU kernels (no g++)")
    cfg = minimax_config(hidden=32, heads=2, head_dim=16, kv_heads=1, attn_types=(0, 1), intermediate=8,
                         shared_intermediate=8)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    device = Device(weight_dtype=ms.bfloat16, kernels=True, block_size=8, cache_blocks=3)
    m = MiniMaxForCausalLM(ModelConfig.from_dir(str(tmp_path)), device, 2)
    layer = m.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == ms.bfloat16
    assert layer.block_sparse_moe.gate.weight.dtype == ms.float32 and layer.coefficient.weight.dtype == ms.float32
