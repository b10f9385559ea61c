"""Sparse attention through the model and the engine on a tiny random MiniCPM: switching it on,
decode against a whole-sequence prefill, sparse == dense when top-k covers everything,
chunking, preemption and concurrency, and the refusals."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.test_model_hf import prefill_logits
from tests.tiny import make_tiny_model

SPARSE = dict(window_size=128, topk=2, dense_len=-1)  # scaled down: crosses every boundary by ~300 tokens
PROMPTS = [[256] + [(7 * i + 3 * j) % 250 for i in range(n)] for j, n in enumerate([290, 200, 333])]


def _write_config(path, **extra):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(architectures=["MiniCPMForCausalLM"], scale_emb=2.0, scale_depth=1.4, dim_model_base=16,
               tie_word_embeddings=False, **extra)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_model(str(tmp_path_factory.mktemp("tiny_sparse")))
    _write_config(path, sparse_config=SPARSE)
    return path


def _llm(path, **kw):
    from mindcpm import LLM
    kw.setdefault("max_model_len", 512)
    return LLM(model=path, progress=False, **kw)


def _greedy(n):
    from mindcpm import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_sparse_config_from_checkpoint(model_dir):
    llm = _llm(model_dir)
    assert llm.engine.runner.backend_name == "infllm-v2"
    assert llm.config.sparse.topk == 2 and llm.config.sparse.variant == "current"


def test_decode_after_chunked_prefill_equals_whole_prefill(model_dir):
    llm = _llm(model_dir, max_num_batched_tokens=96)  # prompt prefilled in chunks of 96
    prompt = PROMPTS[0]
    gen = _tokens(llm.generate({"prompt_token_ids": prompt}, _greedy(40)))[0]
    full = prompt + gen
    logits = prefill_logits(llm, [full[:-1]])[0]  # one 329-token prefill
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == gen


def test_topk_covering_all_blocks_equals_dense(model_dir, tmp_path):
    import shutil
    wide = str(tmp_path / "wide")
    shutil.copytree(model_dir, wide)
    _write_config(wide, sparse_config=dict(SPARSE, topk=64))
    prompt = PROMPTS[2]
    dense = prefill_logits(_llm(model_dir, sparse_attention=False), [prompt])[0]
    np.testing.assert_allclose(prefill_logits(_llm(wide), [prompt])[0], dense, atol=1e-4, rtol=0)
    sparse = prefill_logits(_llm(model_dir), [prompt])[0]
    assert np.abs(sparse - dense)[200:].max() > 1e-2  # and the scaled-down config is really sparse


@pytest.mark.parametrize("variant", ["current", "june2025"])
def test_concurrent_and_preempted_equal_alone(model_dir, variant):
    llm = _llm(model_dir, max_num_seqs=1, sparse_attention=variant)
    alone = [_tokens(llm.generate({"prompt_token_ids": p}, _greedy(30)))[0] for p in PROMPTS]
    # 32 blocks of 16 tokens: three ~20-block sequences cannot all stay, so some are preempted
    # (their C1/C2 freed with their blocks) and recomputed.
    busy = _llm(model_dir, max_num_seqs=3, max_num_batched_tokens=128, kv_cache_gib=1e-9,
                sparse_attention=variant)
    assert busy.engine.scheduler.block_manager.num_blocks == 32
    assert _tokens(busy.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy(30))) == alone
    blocks = busy.engine.scheduler.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks


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
        _llm(model_dir, block_size=8)
