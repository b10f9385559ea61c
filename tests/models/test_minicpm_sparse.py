"""Sparse attention through the model and the engine on a tiny random MiniCPM: switching it on,
decode against a whole-sequence prefill, sparse == dense when top-k covers everything,
chunking, preemption and concurrency, and the refusals."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.engine_probe import prefill_logits, tokens
from safetensors.numpy import save_file

from tests.tiny import VOCAB, make_llm, write_byte_tokenizer

SPARSE = dict(window_size=128, topk=2, dense_len=-1)  # scaled down: crosses every boundary by ~300 tokens
PROMPTS = [[256] + [(7 * i + 3 * j) % 250 for i in range(n)] for j, n in enumerate([290, 200, 300])]
MAX_LEN = 512  # the longest prompt plus its decode steps


CONFIG = dict(architectures=["MiniCPMForCausalLM"], vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-5, scale_emb=2.0, scale_depth=1.4, dim_model_base=16, tie_word_embeddings=False,
              bos_token_id=256, eos_token_id=257)


def make_sparse_model(path: str, sparse_config: dict, layers: int = 1, seed: int = 0) -> str:
    """A random MiniCPM, one layer by default (it keeps the sparse graphs quick to compile)."""
    rng = np.random.default_rng(seed)
    h, i, d, kv = 64, 128, 16, 2
    shapes = {"model.embed_tokens.weight": (VOCAB, h), "lm_head.weight": (VOCAB, h), "model.norm.weight": (h,)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv * d, h),
                       p + "self_attn.v_proj.weight": (kv * d, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    tensors = {name: (rng.uniform(0.7, 1.3, shape) if len(shape) == 1 else rng.normal(0, 0.08, shape))
               for name, shape in shapes.items()}
    os.makedirs(path, exist_ok=True)
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(CONFIG, num_hidden_layers=layers, sparse_config=sparse_config), f)
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_sparse_model(str(tmp_path_factory.mktemp("tiny_sparse")), SPARSE)


def _greedy(n):
    from mindcpm import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def test_sparse_config_from_checkpoint(model_dir):
    llm = make_llm(model_dir, max_model_len=MAX_LEN)
    assert llm.engine.runner.backend_name == "infllm-v2"
    assert llm.config.sparse.topk == 2 and llm.config.sparse.variant == "current"


@pytest.mark.parametrize("variant, kernels", [("current", "auto"), ("june2025", "off")])
def test_decode_after_prefill_equals_whole_prefill(model_dir, variant, kernels, monkeypatch):
    # Chunked prefill against the reference is in tests/layers/test_sparse.py; here one shape each,
    # with the C++ kernels (where g++ builds them) and with the composite cells.
    if kernels == "off":
        monkeypatch.setenv("MINDCPM_KERNELS", "off")
    llm = make_llm(model_dir, max_model_len=MAX_LEN, sparse_attention=variant)
    layer = llm.engine.runner.model.layers[0].self_attn.attend.backend
    assert layer.kernel is None or kernels != "off"
    prompt = PROMPTS[0]
    gen = tokens(llm.generate({"prompt_token_ids": prompt}, _greedy(24)))[0]
    logits = prefill_logits(llm, [(prompt + gen)[:-1]])[0]  # decode crossed 304 and 320
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == gen


def reference_run(path, prompt, chunk, steps):
    """The float64 reference through the engine's calls: the prompt in chunks of `chunk` tokens
    (the scheduler's token budget), then `steps` greedy decode steps. Returns (logits of the
    prompt's positions, greedy tokens)."""
    from safetensors.numpy import load_file
    from tests.reference.minicpm_sparse_numpy import Reference
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    weights = {k: v.astype(np.float64) for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    ref = Reference(hf, weights)
    logits = np.concatenate([ref.extend(prompt[i:i + chunk]) for i in range(0, len(prompt), chunk)])
    out = [int(logits[-1].argmax())]
    for _ in range(steps - 1):
        out.append(int(ref.extend(out[-1:])[-1].argmax()))
    return logits, out


# dense_len 200: a 150-token prompt starts dense and its decode turns sparse at 200; a 290-token
# one is sparse from its first token, so its queries before 127 see no coarse kernel (the
# visible-C2 edge) and those before 31 no fine one; chunks of 128 make the first chunk dense (a
# call of 128 < 200 tokens) and the next ones sparse, so the chunking decides (as documented).
REFERENCE_CASES = [("current", 150, 512, 60), ("june2025", 150, 512, 60), ("current", 290, 512, 8),
                   ("current", 290, 128, 8), ("june2025", 290, 128, 8)]


@pytest.fixture(scope="module")
def reference_llms(tmp_path_factory):
    """(variant, token budget) -> an LLM on a 2-layer model with dense_len 200, made once."""
    made = {}

    def get(variant, chunk):
        if (variant, chunk) not in made:
            path = str(tmp_path_factory.getbasetemp() / f"sparse2-{variant}")
            if not os.path.isdir(path):
                make_sparse_model(path, dict(window_size=64, topk=2, dense_len=200, variant=variant), layers=2, seed=4)
            made[variant, chunk] = path, make_llm(path, max_model_len=MAX_LEN, max_num_seqs=1,
                                                  max_num_batched_tokens=chunk)
        return made[variant, chunk]
    return get


@pytest.mark.parametrize("variant, prompt_len, chunk, steps", REFERENCE_CASES)
def test_model_matches_float64_reference(reference_llms, variant, prompt_len, chunk, steps):
    path, llm = reference_llms(variant, chunk)
    prompt = [256] + [int(t) for t in np.random.default_rng(prompt_len).integers(0, 250, prompt_len - 1)]
    ref_logits, ref_tokens = reference_run(path, prompt, chunk, steps)
    assert tokens(llm.generate({"prompt_token_ids": prompt}, _greedy(steps)))[0] == ref_tokens
    if chunk >= prompt_len:  # one call: the all-position probe computes it the same way
        got = prefill_logits(llm, [prompt])[0]
        np.testing.assert_allclose(got, ref_logits, atol=2e-4 * np.abs(ref_logits).max(), rtol=0)


def test_topk_covering_all_blocks_equals_dense(model_dir, tmp_path):
    wide = make_sparse_model(str(tmp_path / "wide"), dict(SPARSE, topk=64))
    prompt = PROMPTS[2]
    dense = prefill_logits(make_llm(model_dir, max_model_len=MAX_LEN, sparse_attention=False), [prompt])[0]
    wide_logits = prefill_logits(make_llm(wide, max_model_len=MAX_LEN), [prompt])[0]
    np.testing.assert_allclose(wide_logits, dense, atol=1e-4, rtol=0)
    sparse = prefill_logits(make_llm(model_dir, max_model_len=MAX_LEN), [prompt])[0]
    assert np.abs(sparse - dense)[200:].max() > 1e-2  # and the scaled-down config is really sparse


def test_preempted_and_batched_equal_alone(model_dir, monkeypatch):
    prompts = PROMPTS[:2]
    llm = make_llm(model_dir, max_model_len=MAX_LEN, max_num_seqs=1)
    alone = [tokens(llm.generate({"prompt_token_ids": p}, _greedy(24)))[0] for p in prompts]
    # 32 blocks of 16 tokens hold both prompts (19 + 13 blocks) but not the first one's 20th
    # block: the younger sequence is preempted (its C1/C2 freed with its blocks) and recomputed.
    busy = make_llm(model_dir, max_model_len=MAX_LEN, max_num_seqs=2, kv_cache_gib=1e-9)
    scheduler = busy.engine.scheduler
    assert scheduler.block_manager.num_blocks == 32
    preempted = []
    original = scheduler._preempt
    monkeypatch.setattr(scheduler, "_preempt", lambda seq: (preempted.append(seq.seq_id), original(seq)))
    assert tokens(busy.generate([{"prompt_token_ids": p} for p in prompts], _greedy(24))) == alone
    assert preempted
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


def test_option_adds_documented_default(tmp_path):
    from mindcpm.config import ModelConfig
    hf = dict(architectures=["MiniCPMForCausalLM"], vocab_size=32, hidden_size=64, intermediate_size=8,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, dim_model_base=16)
    cfg = ModelConfig.from_hf(hf)
    assert cfg.sparse is None
    on = cfg.with_sparse(True).sparse
    assert (on.kernel_size, on.kernel_stride, on.init_blocks, on.block_size, on.window_size, on.topk,
            on.use_nope, on.dense_len, on.variant) == (32, 16, 1, 64, 2048, 64, False, 8192, "current")
    assert cfg.with_sparse("june2025").sparse.variant == "june2025"
    assert ModelConfig.from_hf(dict(hf, sparse_config={"topk": 8})).with_sparse(False).sparse is None


def test_refusals(model_dir):
    from mindcpm.config import ConfigError, ModelConfig
    half_b = dict(architectures=["MiniCPMForCausalLM"], vocab_size=73448, hidden_size=1024, intermediate_size=4096,
                  num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=2, dim_model_base=256)
    with pytest.raises(ConfigError, match="MiniCPM4-0.5B does not support sparse attention"):
        ModelConfig.from_hf(dict(half_b, sparse_config={}))
    with pytest.raises(ConfigError, match="MiniCPM4-0.5B"):
        ModelConfig.from_hf(half_b).with_sparse(True)
    with pytest.raises(ConfigError, match="variant"):
        ModelConfig.from_hf(dict(half_b, hidden_size=2048)).with_sparse("newest")
    with pytest.raises(ConfigError, match="kernel_size"):
        ModelConfig.from_hf(dict(half_b, hidden_size=2048, sparse_config={"kernel_size": 64}))
    with pytest.raises(ValueError, match="block_size 16"):
        make_llm(model_dir, max_model_len=MAX_LEN, block_size=8)


def test_cli_option():
    from mindcpm.cli import ArgumentParser, _sparse_option, add_model_args
    parser = ArgumentParser()
    add_model_args(parser, "")
    assert _sparse_option(parser.parse_args([])) is None
    assert _sparse_option(parser.parse_args(["--sparse-attention"])) == "current"
    assert _sparse_option(parser.parse_args(["--sparse-attention", "june2025"])) == "june2025"
    assert _sparse_option(parser.parse_args(["--sparse-attention", "off"])) is False
