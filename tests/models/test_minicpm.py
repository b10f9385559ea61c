"""Our cells and engine against Hugging Face transformers' LlamaForCausalLM (CPU, fp32)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.engine_probe import prefill_logits
from tests.reference.hf_llama import reference_logits
from tests.tiny import TINY_LLAMA, make_llm, make_tiny_model, write_byte_tokenizer

PROMPTS = [[256, 5, 9, 33, 7], list(range(2, 40)), [256] + list(range(100, 117)), [256, 80]]
MAX_LEN = 256  # prompt plus 32 greedy steps of the reference


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    return reference_logits(tiny_dir, PROMPTS, str(tmp_path_factory.mktemp("ref")), greedy_steps=32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))




def test_logits_match_transformers(tiny_dir, reference):
    ref_logits, _ = reference
    llm = make_llm(tiny_dir, max_model_len=MAX_LEN, enable_prefix_caching=False)
    for ours, ref in zip(prefill_logits(llm, PROMPTS), ref_logits):
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers_through_engine(tiny_dir, reference):
    from mindcpm import SamplingParams
    _, ref_greedy = reference
    llm = make_llm(tiny_dir, max_model_len=MAX_LEN, block_size=8, max_num_seqs=3)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    assert [o.outputs[0].token_ids for o in outs] == ref_greedy
    assert llm.engine.scheduler.block_manager.num_free_blocks == llm.engine.scheduler.block_manager.num_blocks


def test_logprobs_match_transformers(tiny_dir, reference):
    from mindcpm import SamplingParams
    ref_logits, _ = reference
    llm = make_llm(tiny_dir, max_model_len=MAX_LEN)
    out = llm.generate({"prompt_token_ids": PROMPTS[1]},
                       SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3, logprobs=3))[0]
    ref = log_softmax(ref_logits[1].astype(np.float64))
    assert out.prompt_logprobs[0] is None
    for pos, entry in enumerate(out.prompt_logprobs[1:]):
        for token, lp in entry.items():
            assert abs(lp - ref[pos, token]) < 1e-4
        assert sorted(entry, key=lambda t: -ref[pos, t])[:3] == list(np.argsort(-ref[pos], kind="stable")[:3])
    first = out.outputs[0].logprobs[0]
    assert out.outputs[0].token_ids[0] == int(np.argmax(ref[-1]))
    for token, lp in first.items():
        assert abs(lp - ref[-1, token]) < 1e-4


# -- μP: a MiniCPM checkpoint equals a Llama whose weights carry the scales ----------------------
SCALE_EMB, SCALE_DEPTH, DIM_MODEL_BASE = 12.0, 1.4, 16  # hidden 64 -> logits ÷ 4


@pytest.mark.parametrize("tied", [False, True])
def test_mup_scales_equal_rescaled_llama(tiny_dir, tmp_path, tied):
    weights = load_file(os.path.join(tiny_dir, "model.safetensors"))
    residual = SCALE_DEPTH / np.sqrt(TINY_LLAMA["num_hidden_layers"])
    logit_div = TINY_LLAMA["hidden_size"] / DIM_MODEL_BASE
    minicpm = {k: v.copy() for k, v in weights.items()}
    minicpm["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] / SCALE_EMB
    for k in minicpm:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            minicpm[k] = weights[k] / residual
    llama = dict(weights)
    if tied:
        del minicpm["lm_head.weight"]
        llama["lm_head.weight"] = minicpm["model.embed_tokens.weight"] / logit_div
    else:
        minicpm["lm_head.weight"] = weights["lm_head.weight"] * logit_div

    ours, ref_dir = str(tmp_path / "minicpm"), str(tmp_path / "llama")
    for d, tensors in ((ours, minicpm), (ref_dir, llama)):
        os.makedirs(d)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(d, "model.safetensors"),
                  metadata={"format": "pt"})
        write_byte_tokenizer(d)
    shutil.copy(os.path.join(tiny_dir, "config.json"), os.path.join(ref_dir, "config.json"))
    cfg = dict(TINY_LLAMA, architectures=["MiniCPMForCausalLM"], scale_emb=SCALE_EMB, scale_depth=SCALE_DEPTH,
               dim_model_base=DIM_MODEL_BASE)
    cfg.pop("tie_word_embeddings")
    if not tied:
        cfg["tie_word_embeddings"] = False  # absent means tied for MiniCPM
    with open(os.path.join(ours, "config.json"), "w") as f:
        json.dump(cfg, f)

    ref, _ = reference_logits(ref_dir, PROMPTS[:2], str(tmp_path))
    llm = make_llm(ours, max_model_len=MAX_LEN)
    assert llm.config.tie_word_embeddings == tied
    for mine, theirs in zip(prefill_logits(llm, PROMPTS[:2]), ref):
        np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=0)
