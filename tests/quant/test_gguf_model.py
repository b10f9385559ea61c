"""A whole GGUF model kept quantized (Q8_0 / Q4_0 / Q4_1 projections, run on the quantized
kernels from the file's own blocks) against transformers in fp32 running the DEQUANTIZED
weights. The reference checkpoint is built here without mindcpm: the original weights in
Hugging Face row order, quantized and dequantized by gguf-py (blocks run along a row, so this is
the same as dequantizing the llama.cpp-permuted rows and un-permuting them). What is left between
the two is the kernels' fp32 accumulation order, so the tolerance is the fp32 one of the other
whole-model tests, not a quantization error."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
gguf = pytest.importorskip("gguf")
from safetensors.numpy import save_file  # noqa: E402

from tests.engine_probe import prefill_logits  # noqa: E402
from tests.reference.hf_llama import reference_logits_each  # noqa: E402
from tests.test_gguf import (FFN, HEADS, HIDDEN, KV_HEADS, LAYERS, gguf_names, hf_weights,  # noqa: E402
                             llama_cpp_permute, tiny_writer)
from tests.tiny import SPECIALS, VOCAB, make_llm  # noqa: E402

PROMPTS = [[256, 5, 9, 33, 7], list(range(2, 40)), [256] + list(range(100, 117))]
STEPS = 8  # greedy tokens decoded through the engine
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# file -> GGUF type of each projection kind: one type throughout, or a mix of the three (each
# fused group, q|k|v and gate|up, in one type; the MLP block op then takes two formats)
FILES = {t: dict.fromkeys(PROJECTIONS, t) for t in ("Q8_0", "Q4_0", "Q4_1")}
FILES["mixed"] = dict(attn_q="Q8_0", attn_k="Q8_0", attn_v="Q8_0", attn_output="Q4_0", ffn_gate="Q4_1",
                      ffn_up="Q4_1", ffn_down="Q8_0")
# q Q8_0 beside k|v Q4_0: one fused q|k|v matrix cannot hold both, so the model runs dequantized
ALL_FILES = dict(FILES, qkv_mixed=dict(FILES["Q4_0"], attn_q="Q8_0"))
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}
# (bits of a code, whether blocks carry an offset) as the kernel holds each type
LAYOUT = {"Q8_0": (8, False), "Q4_0": (4, False), "Q4_1": (4, True)}


def llama_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """test_gguf's random weights (tied embeddings) at the scale of tests/reference/hf_llama.py:
    matrices N(0, 0.08), norm weights in [0.7, 1.3]."""
    rng = np.random.default_rng(seed + 1)
    return {name: (w * np.float32(0.08) if w.ndim == 2 else rng.uniform(0.7, 1.3, w.shape).astype(np.float32))
            for name, w in hf_weights(VOCAB, seed).items()}


def file_tensors(weights: dict, types: dict) -> dict[str, tuple[str, str, np.ndarray]]:
    """GGUF name -> (Hugging Face name, GGUF type, weight in Hugging Face row order): norms F32,
    the (tied) embedding F16, each projection the type `types` gives its kind."""
    tensors = {}
    for gguf_name, hf_name in gguf_names(weights).items():
        kind, w = gguf_name.split(".")[-2], weights[hf_name]
        tensors[gguf_name] = hf_name, types.get(kind, "F16" if w.ndim == 2 else "F32"), w
    return tensors


def stored(weight: np.ndarray, type_name: str) -> np.ndarray:
    """What a tensor of this type stands for, decoded by gguf-py as fp32."""
    if type_name in FLOAT_TYPES:
        return weight.astype(FLOAT_TYPES[type_name]).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[type_name]
    return gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype).reshape(weight.shape)


def byte_vocab() -> tuple[list[str], list[int]]:
    """tests/tiny.py's byte-level vocabulary as GGUF tokens and token types."""
    from tokenizers import pre_tokenizers
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + SPECIALS
    types = [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] * len(SPECIALS)
    assert len(tokens) == VOCAB
    return tokens, types


def write_llama_gguf(path: str, tensors: dict) -> None:
    """A llama-architecture GGUF as llama.cpp's converter lays it out (q/k rows permuted)."""
    writer = tiny_writer(path, "llama")
    tokens, types = byte_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    for gguf_name, (_, type_name, w) in tensors.items():
        kind = gguf_name.split(".")[-2]
        if kind in ("attn_q", "attn_k"):
            w = llama_cpp_permute(w, HEADS if kind == "attn_q" else KV_HEADS)
        if type_name in FLOAT_TYPES:
            writer.add_tensor(gguf_name, w.astype(FLOAT_TYPES[type_name]))
        else:
            qtype = gguf.GGMLQuantizationType[type_name]
            writer.add_tensor(gguf_name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_reference_checkpoint(out: str, tensors: dict) -> None:
    """The weights the file stands for as a transformers Llama checkpoint, written without mindcpm."""
    os.makedirs(out)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN,
                  intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu",
                  bos_token_id=256, eos_token_id=257, torch_dtype="float32")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({hf_name: stored(w, type_name) for hf_name, type_name, w in tensors.values()},
              os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """ALL_FILES name -> (GGUF file, its types, {"logits": per prompt, "greedy": per prompt} of
    transformers on the dequantized weights)."""
    from mindcpm.ops.cpu_kernels import kernels_available
    if not kernels_available():
        pytest.skip("no g++ to build the CPU kernels: GGUF blocks run only there")
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("gguf_model")
    weights = llama_weights()
    files, refs = {}, []
    for name, types in ALL_FILES.items():
        tensors = file_tensors(weights, types)
        files[name] = str(root / f"tiny-{name}.gguf")
        write_llama_gguf(files[name], tensors)
        refs.append(str(root / f"ref-{name}"))
        write_reference_checkpoint(refs[-1], tensors)
    # All reference checkpoints in one transformers subprocess (torch starts once).
    outputs = reference_logits_each(refs, PROMPTS, str(root), STEPS)
    return {name: (files[name], types, {"logits": logits, "greedy": greedy})
            for (name, types), (logits, greedy) in zip(ALL_FILES.items(), outputs)}


def assert_prompt_logits_match(llm, ref: dict) -> None:
    """Two fp32 layers summed in another order: seen up to 2e-6 on logits of magnitude ~2.5 (8e-7
    relative), where the unquantized weights would move them by 4e-2 (Q8_0) to 0.6 (Q4_0)."""
    for mine, theirs in zip(prefill_logits(llm, PROMPTS), ref["logits"]):
        np.testing.assert_allclose(mine, theirs, atol=1e-5 * np.abs(theirs).max(), rtol=0)


# fused: each decoder layer as the quantized kernels' block ops (Device.fuse_blocks), or layer by
# layer (the plain / swiglu / residual entries; once, on the mixed file)
CASES = [(name, True) for name in FILES] + [("mixed", False)]


@pytest.mark.parametrize("name,fused", CASES)
def test_gguf_model_kept_quantized_matches_transformers_on_dequantized_weights(models, monkeypatch, fp32_gemm, name,
                                                                              fused):
    from mindcpm import SamplingParams
    from mindcpm.ops.device import Device
    if not fused:
        monkeypatch.setattr(Device, "fuse_blocks", lambda self, model: None)
    path, types, ref = models[name]
    llm = make_llm(path, kernels="on", enable_prefix_caching=False)
    assert llm.quantization == "gguf"  # the file's blocks run, not its dequantized fp32 copy
    layer = llm.engine.runner.model.layers[0]
    assert (type(layer).__name__ == "KernelQuantDecoderLayer") == fused
    projections = {"attn_q": layer.self_attn.qkv_proj, "attn_output": layer.self_attn.o_proj,
                   "ffn_gate": layer.mlp.gate_up_proj, "ffn_down": layer.mlp.down_proj}
    for kind, proj in projections.items():
        bits, has_offsets = LAYOUT[types[kind]]
        assert proj.quantized and proj.weight_packed.dtype == ms.uint8
        assert proj.weight_packed.shape[1] * 8 == proj.in_features * bits
        assert proj.weight_scales.shape[1] * 32 == proj.in_features  # one fp16 d per block of 32 inputs
        assert (proj.weight_offsets.shape == proj.weight_scales.shape) == has_offsets
    assert_prompt_logits_match(llm, ref)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == ref["greedy"]


def test_gguf_mixing_types_in_a_fused_projection_runs_dequantized(models, caplog):
    """A file whose q, k and v differ in type (llama.cpp runs it) runs its dequantized fp32 weights
    with a notice naming the tensors, rather than failing to fuse them; asked to keep them, it is an error."""
    path, _, ref = models["qkv_mixed"]
    with caplog.at_level("WARNING", "mindcpm"):
        llm = make_llm(path, kernels="on", enable_prefix_caching=False)
    assert llm.quantization is None
    (notice,) = [r.getMessage() for r in caplog.records if "dequantized fp32" in r.getMessage()]
    assert "blk.0.attn_q/attn_k/attn_v have GGUF types Q8_0/Q4_0/Q4_0" in notice
    assert_prompt_logits_match(llm, ref)
    with pytest.raises(ValueError, match="cannot keep this GGUF model quantized: blk.0.attn_q/attn_k/attn_v"):
        make_llm(path, quantization="gguf")
