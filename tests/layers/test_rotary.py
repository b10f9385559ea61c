"""LongRoPE against a numpy implementation written from docs/minicpm4.md#longrope (MiniCPMLongRoPE)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mindcpm.config import ModelConfig


def spec_longrope(d, base, max_pos, original, short, long, positions):
    inv_freq = 1.0 / base ** (np.arange(0, d, 2) / d)                      # step 1
    scale = max_pos / original                                              # step 2
    mscale = math.sqrt(1 + math.log(scale) / math.log(original))           # step 3
    ext = np.asarray(long if max_pos > original else short)                 # step 4
    freq = np.outer(positions, inv_freq / ext)                              # step 5
    emb = np.concatenate([freq, freq], -1)                                  # step 6
    return np.cos(emb) * mscale, np.sin(emb) * mscale


def rotate(x, cos, sin):                                                    # step 7
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def config(max_pos, original, d=16):
    rng = np.random.default_rng(0)
    short = (1 + rng.random(d // 2) * 3).tolist()
    long = (2 + rng.random(d // 2) * 40).tolist()
    hf = dict(architectures=["MiniCPMForCausalLM"], vocab_size=32, hidden_size=4 * d, intermediate_size=8,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
              dim_model_base=16, scale_emb=1, scale_depth=1,
              rope_scaling=dict(rope_type="longrope", short_factor=short, long_factor=long,
                                original_max_position_embeddings=original))
    return ModelConfig.from_hf(hf), short, long


@pytest.mark.parametrize("max_pos,original", [(512, 128), (256, 256), (128, 256)])
def test_rope_tables_match_spec(max_pos, original):
    from mindcpm.layers.rotary import rope_tables
    cfg, short, long = config(max_pos, original)
    cos, sin = rope_tables(cfg.rope)
    positions = np.arange(max_pos)  # below and (for the first case) far above the original length
    ref_cos, ref_sin = spec_longrope(16, 10000.0, max_pos, original, short, long, positions)
    if max_pos > original:
        assert math.sqrt(1 + math.log(max_pos / original) / math.log(original)) > 1.1  # mscale in play
    # fp32 angles: error grows with t * inv_freq; 5e-5 rad at position 512.
    np.testing.assert_allclose(cos, ref_cos, atol=5e-5)
    np.testing.assert_allclose(sin, ref_sin, atol=5e-5)


def test_rotary_cell_applies_tables():
    import mindspore as ms
    from mindspore import Tensor
    from mindcpm.layers.rotary import RotaryEmbedding
    cfg, short, long = config(512, 128)
    rng = np.random.default_rng(1)
    positions = np.array([[0, 5, 127, 128, 300, 511]], np.int32)
    q = rng.standard_normal((1, 6, 4, 16)).astype(np.float32)
    k = rng.standard_normal((1, 6, 2, 16)).astype(np.float32)
    q_out, k_out = RotaryEmbedding(cfg.rope)(Tensor(positions), Tensor(q), Tensor(k))
    cos, sin = spec_longrope(16, 10000.0, 512, 128, short, long, positions[0])
    np.testing.assert_allclose(q_out.asnumpy(), rotate(q, cos[None, :, None], sin[None, :, None]), atol=1e-4)
    np.testing.assert_allclose(k_out.asnumpy(), rotate(k, cos[None, :, None], sin[None, :, None]), atol=1e-4)


def test_partial_rope_rotates_first_64_of_128_dims():
    """MiniMax's partial RoPE against tests/reference/minimax_numpy.py."""
    import mindspore as ms
    from tests.reference import minimax_numpy as R
    from mindcpm.config import RopeConfig
    from mindcpm.layers.rotary import RotaryEmbedding
    rng = np.random.default_rng(0)
    rope = RotaryEmbedding(RopeConfig(128, 1e7, 4096, rotary_dim=64))
    positions = np.array([[0, 1, 7, 100, 4000]], np.int32)
    q = rng.standard_normal((1, 5, 3, 128))
    k = rng.standard_normal((1, 5, 2, 128))
    got = rope(ms.Tensor(positions), ms.Tensor(q, ms.float32), ms.Tensor(k, ms.float32))
    got_q, got_k = (x.asnumpy() for x in got)
    for got, x in ((got_q, q), (got_k, k)):
        ref = R.partial_rope(x[0], positions[0].astype(np.float64), 64, 1e7)
        np.testing.assert_allclose(got[0], ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(got[..., 64:], x[..., 64:].astype(np.float32))
