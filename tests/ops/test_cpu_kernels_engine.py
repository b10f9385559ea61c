"""The engine with the CPU kernels on vs off (MindSpore's own ops) on a tiny random model:
greedy tokens and logprobs unchanged, through batching and chunked prefill; 16-bit weights.
Each run checks which kernels MindSpore actually ran (kernel_uses): none with the kernels off,
the decoder blocks', the embedding's and the head's with them on, so that a silent fallback to
MindSpore's ops cannot pass for the kernels."""
from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mindcpm.ops.cpu_kernels import kernel_uses, kernels_available
from tests.tiny import make_tiny_model

pytestmark = pytest.mark.skipif(not kernels_available(), reason="no g++ to build the CPU kernels")

PROMPTS = [[256] + list(range(3 + i, 3 + i + n)) for i, n in enumerate([3, 17, 9, 30, 1, 12])]
# A MiniCPM/Llama step with the kernels: one op per attention block and per MLP block, the
# embedding, and the head.
MODEL_KERNELS = {"paged_attention:RmsNormAttentionBlock", "linear:RmsNormSwigluMlp", "embedding:Embedding",
                 "linear:Linear"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_kernels")))


def _run(path, prompts=PROMPTS, max_tokens=12, **kw):
    """(llm, greedy tokens, their logprobs, the kernels that ran)."""
    from mindcpm import LLM, SamplingParams
    kw = dict(dict(max_model_len=64, block_size=8, max_num_seqs=4, progress=False), **kw)
    before = kernel_uses()
    llm = LLM(model=path, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    tokens = [o.outputs[0].token_ids for o in outs]
    logprobs = [[e[t] for e, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
    return llm, tokens, logprobs, set(kernel_uses() - before)


@pytest.fixture(scope="module")
def native(tiny_dir):
    llm, tokens, logprobs, ran = _run(tiny_dir, kernels="off")
    assert not llm.kernels and ran == set()
    assert not any(type(layer).__name__ == "KernelDecoderLayer" for layer in llm.engine.runner.model.layers)
    return tokens, logprobs


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=16),
                                dict(max_num_batched_tokens=16, compile_prefill=False)],
                         ids=["batched", "chunked", "chunked-prefill-op-by-op"])
def test_tokens_and_logprobs_unchanged_with_kernels(tiny_dir, native, kw, monkeypatch):
    # Op-by-op decode compiles after a few steps here, so the run switches mid-sequence.
    monkeypatch.setattr("mindcpm.ops.device.EAGER_DECODE_STEPS", 3)
    llm, tokens, logprobs, ran = _run(tiny_dir, kernels="on", **kw)
    assert llm.kernels and ran >= MODEL_KERNELS
    # Every decoder layer ran as its two block kernels, so those are what the tokens compare.
    layers = llm.engine.runner.model.layers
    assert all(type(layer).__name__ == "KernelDecoderLayer" for layer in layers)
    steps = {type(step).__name__ for step in llm.engine.runner.steps.values()}
    assert steps == ({"_CompiledStep"} if kw.get("compile_prefill", True) else {"_CompiledStep", "_EagerStep"})
    assert tokens == native[0]
    for mine, theirs in zip(logprobs, native[1]):
        np.testing.assert_allclose(mine, theirs, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_weights_match_fp32_run_of_the_rounded_weights(tiny_dir, tmp_path, dtype):
    """Weights kept in 16 bits with fp32 activations compute what fp32 does on the same
    (16-bit-rounded) weights: the rounding is the only difference from an fp32 model."""
    import mindspore as ms
    from mindspore import Tensor
    rounded = str(tmp_path / "rounded")
    os.makedirs(rounded)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tiny_dir, name), "rb") as f, open(os.path.join(rounded, name), "wb") as g:
            g.write(f.read())
    ms_dtype = {"bfloat16": ms.bfloat16, "float16": ms.float16}[dtype]
    weights = {k: Tensor(v, ms_dtype).astype(ms.float32).asnumpy() if v.ndim == 2 else v
               for k, v in load_file(os.path.join(tiny_dir, "model.safetensors")).items()}
    save_file(weights, os.path.join(rounded, "model.safetensors"), metadata={"format": "pt"})

    llm16, tokens16, lp16, ran = _run(rounded, dtype=dtype)
    assert llm16.weight_dtype == dtype and llm16.dtype == "float32"
    # 16-bit weights take the kernels whatever the rows (MindSpore has no bf16 CPU MatMul).
    assert ran >= MODEL_KERNELS and "paged_attention:RopePagedAttention" not in ran
    layer = llm16.engine.runner.model.layers[0]
    assert layer.mlp.gate_up_proj.weight.dtype == ms_dtype
    assert layer.input_layernorm.weight.dtype == ms.float32
    _, tokens32, lp32, _ = _run(rounded, dtype="float32", kernels="off")
    assert tokens16 == tokens32
    for mine, theirs in zip(lp16, lp32):
        np.testing.assert_allclose(mine, theirs, atol=2e-5, rtol=0)


def test_bfloat16_on_cpu_without_kernels_is_one_clear_error(tiny_dir):
    from mindcpm import LLM
    with pytest.raises(ValueError, match="bfloat16 on CPU needs the CPU kernels"):
        LLM(model=tiny_dir, dtype="bfloat16", kernels="off", progress=False)


def test_sparse_attention_runs_its_kernels_and_matches_the_composite(tmp_path):
    """InfLLM-v2 with the kernels on runs its selection and block-sparse kernels (which the
    sparse tests compare with the reference) and gives the composite cells' tokens."""
    from tests.models.test_minicpm_sparse import PROMPTS as SPARSE_PROMPTS, SPARSE, make_sparse_model
    path = make_sparse_model(str(tmp_path / "sparse"), SPARSE)
    runs = {}
    for kernels in ("on", "off"):
        runs[kernels] = _run(path, kernels=kernels, max_model_len=512, block_size=16, prompts=SPARSE_PROMPTS[:1],
                              max_tokens=8)
    on, off = runs["on"], runs["off"]
    assert on[3] >= {"infllm_attention:BlockSparseAttention", "infllm_score:InfllmSelect"}
    assert off[3] == set()
    assert on[1] == off[1]
    for mine, theirs in zip(on[2], off[2]):
        np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=0)
