"""mindcpm/config.py: config.json (and generation_config.json) to ModelConfig, against the
published MiniCPM4 values (docs/minicpm4.md) and the documented refusals."""
from __future__ import annotations

import json
import math

import pytest

from mindcpm.config import ConfigError, ModelConfig

# openbmb/MiniCPM4-0.5B's config.json, trimmed to what ModelConfig reads (the factor lists are
# shortened to the right length; their values do not matter here).
MINICPM4_05B = {
    "architectures": ["MiniCPMForCausalLM"], "hidden_size": 1024, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 2, "intermediate_size": 4096, "hidden_act": "silu",
    "vocab_size": 73448, "bos_token_id": 1, "eos_token_id": [2, 73440], "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05, "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256,
    "rope_scaling": {"rope_type": "longrope", "original_max_position_embeddings": 32768,
                     "long_factor": [1.0] * 32, "short_factor": [1.0] * 32},
}
LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 300}


def test_minicpm4_scales_and_defaults():
    cfg = ModelConfig.from_hf(MINICPM4_05B)
    assert cfg.embedding_scale == 12
    assert math.isclose(cfg.residual_scale, 0.285774, rel_tol=1e-5)  # 1.4 / sqrt(24)
    assert cfg.logit_scale == 0.25  # 1 / (1024 / 256)
    assert cfg.tie_word_embeddings  # absent: MiniCPM's configuration class says tied
    assert cfg.eos_token_ids == (2, 73440) and cfg.bos_token_id == 1
    assert (cfg.head_dim, cfg.rope.theta) == (64, 10000.0)
    assert cfg.rope.original_max_position == 32768 and len(cfg.rope.long_factor) == 32
    assert cfg.sparse is None


def test_llama_has_neutral_scales_and_untied_head():
    cfg = ModelConfig.from_hf(LLAMA)
    assert (cfg.embedding_scale, cfg.residual_scale, cfg.logit_scale) == (1.0, 1.0, 1.0)
    assert not cfg.tie_word_embeddings and cfg.rope.short_factor is None


def test_missing_dim_model_base_keeps_the_official_default(caplog):
    hf = {k: v for k, v in MINICPM4_05B.items() if k != "dim_model_base"}
    assert ModelConfig.from_hf(hf).logit_scale == 1 / 1024
    assert "dim_model_base" in caplog.text


def test_eos_ids_merge_config_and_generation_config():
    cfg = ModelConfig.from_hf(dict(LLAMA, eos_token_id=2), {"eos_token_id": [2, 7]})
    assert cfg.eos_token_ids == (2, 7)


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture GPT2LMHeadModel; supported: "),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    (dict(rope_scaling={"rope_type": "yarn"}), "rope_scaling type 'yarn' is not supported"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}),
     "short_factor must have head_dim/2 = 32 entries"),
    (dict(vocab_size=None), "vocab_size"),
])
def test_bad_configs_name_the_problem(change, message):
    hf = dict(MINICPM4_05B, **change)
    if change.get("vocab_size", 0) is None:
        del hf["vocab_size"]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ModelConfig.from_hf(hf)


EIGHT_B_LIKE = dict(MINICPM4_05B, hidden_size=256, num_attention_heads=4, num_key_value_heads=1,
                    rope_scaling=None)


@pytest.mark.parametrize("sparse, message", [
    ({"kernel_size": 64}, "kernel_size/kernel_stride/block_size must be 32/16/64"),
    ({"use_nope": True}, "use_nope=true is not supported"),
    ({"window_size": 100}, "window_size a multiple of block_size"),
    ({"dense_len": -2}, "dense_len must be >= 0 or -1"),
    ({"topk": 0}, "topk >= 1"),
    ({"colour": 1}, "unknown sparse_config key"),
    ({"variant": "v3"}, "sparse variant 'v3' unknown"),
    ({"variant": "june2025", "window_size": 0}, "'june2025' needs window_size >= block_size \\(64\\), got 0"),
    ("yes", "sparse_config must be an object"),
])
def test_bad_sparse_configs_name_the_problem(sparse, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(dict(EIGHT_B_LIKE, sparse_config=sparse))


def test_sparse_config_fills_the_documented_defaults():
    cfg = ModelConfig.from_hf(dict(EIGHT_B_LIKE, sparse_config={"topk": 8}))
    s = cfg.sparse
    assert (s.kernel_size, s.kernel_stride, s.init_blocks, s.block_size, s.window_size, s.topk, s.dense_len,
            s.variant) == (32, 16, 1, 64, 2048, 8, 8192, "current")


def test_june2025_needs_a_window_also_when_chosen_by_the_option():
    """With no window "current" still forces the query's own block in; "june2025" leaves it to the
    window, so the same sparse_config is refused once the option picks that variant."""
    cfg = ModelConfig.from_hf(dict(EIGHT_B_LIKE, sparse_config={"window_size": 0}))
    assert (cfg.sparse.variant, cfg.sparse.window_blocks) == ("current", 0)
    with pytest.raises(ConfigError, match="sparse attention option: sparse variant 'june2025' needs window_size"):
        cfg.with_sparse("june2025")


def test_sparse_refused_for_05b_and_groups_not_dividing_16():
    with pytest.raises(ConfigError, match="MiniCPM4-0.5B does not support sparse attention"):
        ModelConfig.from_hf(dict(MINICPM4_05B, sparse_config={}))
    with pytest.raises(ConfigError, match="group size dividing 16, got 3"):
        ModelConfig.from_hf(dict(EIGHT_B_LIKE, num_attention_heads=6, num_key_value_heads=2, sparse_config={}))


def test_from_dir_errors(tmp_path):
    with pytest.raises(ConfigError, match="model directory not found"):
        ModelConfig.from_dir(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_dir(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        ModelConfig.from_dir(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert ModelConfig.from_dir(str(tmp_path)).eos_token_ids == (5,)


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
