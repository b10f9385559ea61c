"""The MiniMax model and engine against the float64 NumPy reference written from the published maths
(tests/reference/minimax_numpy.py): logits, greedy decoding, and the lightning state slots under
continuous batching, chunked prefill, preemption and abort."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.tiny import tiny_llm

from tests.engine_probe import all_free, tokens
from tests.reference import minimax_numpy as R
from tests.tiny_minimax import make_tiny_minimax, minimax_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny config: hidden 256, 4 heads x 64, 8 layers (softmax at 3 and 7), 4 experts top-2."""
    path = make_tiny_minimax(str(tmp_path_factory.mktemp("minimax")))
    with open(os.path.join(path, "config.json")) as f:
        cfg = R.Config(json.load(f))
    return path, cfg, R.load(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A smaller model for the engine's scheduling tests: fewer graphs' worth of compile time."""
    cfg = minimax_config(hidden=64, heads=2, head_dim=32, kv_heads=1, attn_types=(0, 1, 0), intermediate=32)
    cfg["block"] = 8  # lightning blocks of 8: prefill chunks cross block boundaries
    return make_tiny_minimax(str(tmp_path_factory.mktemp("minimax_small")), cfg, seed=1)


def all_position_logits(path, ids, max_tokens):
    """The runner's logits at every position of one prompt (one prefill, the row padded to the
    max_tokens bucket)."""
    from mindcpm.config import ModelConfig
    from mindcpm.engine.runner import ModelRunner, RunnerConfig
    from mindcpm.engine.sequence import Sequence
    from mindcpm.sampling import SamplingParams
    runner = ModelRunner(ModelConfig.from_dir(path), RunnerConfig(8, 64, 2, max_tokens), path, progress=False)
    seq = Sequence(ids, SamplingParams(), 8)
    seq.block_table, seq.state_slot = list(range(-(-len(ids) // 8))), 1
    inputs, _, _ = runner.prepare([seq], [len(ids)], all_rows=True)
    return runner.forward(inputs).asnumpy()[:len(ids)]


def test_logits_match_reference(tiny):
    path, cfg, weights = tiny
    # Every position's logits of one 300-token prompt: each prefix length, across two lightning
    # blocks of 256, with the row padded to the 512 bucket.
    ids = np.random.default_rng(0).integers(0, 256, 300).tolist()
    got = all_position_logits(path, ids, 512)
    ref, _ = R.forward(cfg, weights, ids)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("shared, postnorm", [(24, True), (0, False)], ids=["shared-expert", "prenorm-residual"])
def test_variants_match_reference(tmp_path, shared, postnorm):
    """The paths M1 leaves unused: the sigmoid-gated shared expert mixed into the MoE output, and
    postnorm=false (the residual carries the un-normalised sum)."""
    mc = minimax_config(hidden=64, heads=4, head_dim=16, kv_heads=2, attn_types=(0, 1, 0), intermediate=32,
                        shared_intermediate=shared, postnorm=postnorm)
    path = make_tiny_minimax(str(tmp_path / "model"), mc, seed=3)
    weights = R.load(os.path.join(path, "model.safetensors"))
    ids = np.random.default_rng(1).integers(0, 256, 40).tolist()
    got = all_position_logits(path, ids, 64)
    ref, _ = R.forward(R.Config(mc), weights, ids)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_greedy_engine_equals_reference_decoding(tiny):
    from mindcpm import SamplingParams
    path, cfg, weights = tiny
    llm = tiny_llm(path, max_num_seqs=2)
    prompt = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert tokens(out)[0] == R.greedy(cfg, weights, prompt, 12)
    assert all_free(llm)


PROMPTS = [[256] + list(range(3 + i, 3 + i + n)) for i, n in enumerate([3, 17, 30, 1, 12])]


@pytest.fixture(scope="module")
def busy(small):
    """Batching, chunked prefill (16-token budget) and a pool of 8 KV blocks that forces preemption,
    in one engine so the graphs compile once."""
    return tiny_llm(small, max_num_seqs=4, max_num_batched_tokens=16, kv_cache_gib=1e-9)


def test_concurrent_equals_alone(busy):
    from mindcpm import SamplingParams
    greedy = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    alone = [tokens(busy.generate({"prompt_token_ids": p}, greedy))[0] for p in PROMPTS]
    blocks = busy.engine.scheduler.block_manager
    assert blocks.num_state_slots == 4 and not blocks.enable_prefix_caching and blocks.num_blocks == 8
    preempted = []
    original = busy.engine.scheduler._preempt
    busy.engine.scheduler._preempt = lambda seq: (preempted.append(seq.seq_id), original(seq))
    try:
        assert tokens(busy.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy)) == alone
    finally:
        busy.engine.scheduler._preempt = original
    assert all_free(busy)
    assert preempted, "the tiny pool was meant to force preemption"


def test_abort_and_preemption_free_state_slots(busy):
    from mindcpm import SamplingParams
    blocks = busy.engine.scheduler.block_manager
    stream = busy.stream({"prompt_token_ids": PROMPTS[3]}, SamplingParams(temperature=0.0, max_tokens=30,
                                                                         ignore_eos=True))
    next(stream)
    assert blocks.num_free_state_slots == 3
    stream.close()
    assert all_free(busy) and not busy.engine.has_unfinished()
    # Preemption hands the slot back; readmission takes one again.
    seq = busy.engine.add_request(PROMPTS[0], SamplingParams(max_tokens=4)).seq
    busy.engine.step()
    assert seq.state_slot is not None and blocks.num_free_state_slots == 3
    busy.engine.scheduler._preempt(busy.engine.scheduler.running.pop())
    assert seq.state_slot is None and blocks.num_free_state_slots == 4
    while busy.engine.has_unfinished():
        busy.engine.step()
    assert all_free(busy)


def test_long_prompt_prefilled_in_chunks(small, tmp_path_factory):
    """150 tokens in chunks of 64 across lightning blocks of 8, with a block table longer than the
    first steps' table bucket: the greedy continuation equals the reference's."""
    from mindcpm import SamplingParams
    llm = tiny_llm(small, max_model_len=512, max_num_batched_tokens=64, max_num_seqs=1)
    prompt = np.random.default_rng(5).integers(0, 256, 150).tolist()
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    with open(os.path.join(small, "config.json")) as f:
        cfg = R.Config(json.load(f))
    assert tokens(out)[0] == R.greedy(cfg, R.load(os.path.join(small, "model.safetensors")), prompt, 3)


@pytest.fixture(scope="module")
def minimax_runner(tiny):
    """The tests' tiny MiniMax checkpoint loaded into a runner: (runner, config dict, float64 weights)."""
    from mindcpm.config import ModelConfig
    from mindcpm.engine.runner import ModelRunner, RunnerConfig
    path, _, weights = tiny
    runner = ModelRunner(ModelConfig.from_dir(path), RunnerConfig(8, 16, 2, 128), path, progress=False)
    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    return runner, cfg, weights


def test_postnorm_residual_flow(minimax_runner):
    """Zero the attention out-projection and the experts' down-projections: the layer must give
    alpha_mlp * RMSNorm_post(alpha_attn * RMSNorm_in(x)) (a pre-norm bug gives alpha_mlp*alpha_attn*x)."""
    import mindspore as ms
    from mindspore import Tensor
    runner, cfg, weights = minimax_runner
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, cfg["hidden_size"]))
    for i in (0, 3):  # a lightning layer and a softmax layer
        layer = runner.model.layers[i]
        attn_out = layer.self_attn.out_proj if i != 3 else layer.self_attn.o_proj
        saved = attn_out.weight.asnumpy(), layer.block_sparse_moe.experts.w2.weight.asnumpy()
        attn_out.weight.set_data(Tensor(np.zeros_like(saved[0]), ms.float32))
        layer.block_sparse_moe.experts.w2.weight.set_data(Tensor(np.zeros_like(saved[1]), ms.float32))
        try:
            out = layer(Tensor(x, ms.float32), Tensor(np.arange(5, dtype=np.int32)[None]),
                        Tensor(np.arange(5, dtype=np.int32) + 8), Tensor(np.array([[1, 2]], np.int32)),
                        Tensor([0], ms.int32), 8).asnumpy()
        finally:
            attn_out.weight.set_data(Tensor(saved[0], ms.float32))
            layer.block_sparse_moe.experts.w2.weight.set_data(Tensor(saved[1], ms.float32))
        p, alpha = f"model.layers.{i}.", cfg["layernorm_mlp_alpha"]
        h = R.rmsnorm(x, weights[p + "input_layernorm.weight"], 1e-5)
        expected = alpha * R.rmsnorm(alpha * h, weights[p + "post_attention_layernorm.weight"], 1e-5)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        assert not np.allclose(out, alpha * alpha * x, atol=1e-2)
