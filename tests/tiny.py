"""Tiny random checkpoints for tests: a Hugging Face Llama (weights from transformers, in a
subprocess) plus a byte-level tokenizer, so the whole LLM API runs on them."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from tests.reference.hf_llama import make_checkpoint

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
VOCAB = 256 + len(SPECIALS)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TINY_LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=256, eos_token_id=257)


def write_byte_tokenizer(path: str) -> None:
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                   "add_eos_token": False, "chat_template": CHATML}, f)


_MADE: dict[tuple[str, int], str] = {}  # (config, seed) -> the checkpoint this process made for it


def make_tiny_model(path: str, config: dict | None = None, seed: int = 0) -> str:
    """The random checkpoint of (config, seed) in `path`. transformers makes each one once per
    process (a subprocess importing torch costs seconds); later calls get a copy of the same files."""
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        key = (json.dumps(config or TINY_LLAMA, sort_keys=True), seed)
        if key not in _MADE:
            made = tempfile.mkdtemp(prefix="mindcpm-tiny-")
            atexit.register(shutil.rmtree, made, True)
            make_checkpoint(config or TINY_LLAMA, made, seed)
            write_byte_tokenizer(made)
            _MADE[key] = made
        shutil.copytree(_MADE[key], path, dirs_exist_ok=True)
    return path


def broken_copies(good: str, root: str) -> dict[str, str]:
    """Copies of the checkpoint `good` under `root`, each broken in one way the loader must name."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    def copy(name: str) -> str:
        return shutil.copytree(good, os.path.join(root, name))

    def rewrite_tensors(name: str, change) -> str:
        path = copy(name)
        file = os.path.join(path, "model.safetensors")
        tensors = load_file(file)
        change(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
        return path

    models = {"no_config": copy("no_config"), "bad_arch": copy("bad_arch"), "truncated": copy("truncated")}
    os.remove(os.path.join(models["no_config"], "config.json"))
    with open(os.path.join(models["bad_arch"], "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(models["bad_arch"], "config.json"), "w") as f:
        json.dump(dict(config, architectures=["GPT2LMHeadModel"]), f)
    weights = os.path.join(models["truncated"], "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    models["wrong_shape"] = rewrite_tensors("wrong_shape", lambda t: t.__setitem__(
        "model.norm.weight", np.ones(t["model.norm.weight"].shape[0] - 1, np.float32)))
    models["missing_tensor"] = rewrite_tensors("missing_tensor", lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    models["unexpected_tensor"] = rewrite_tensors("unexpected_tensor", lambda t: t.__setitem__(
        "model.layers.0.extra.weight", np.ones(4, np.float32)))
    return models


def make_llm(path: str, max_model_len: int = 64, **kw):
    """An LLM over a test checkpoint: no progress bar, and a short context unless the test needs
    a longer one (the KV cache and the RoPE tables are sized by it)."""
    from mindcpm import LLM
    return LLM(model=path, progress=False, max_model_len=max_model_len, **kw)


def tiny_llm(path: str, block_size: int = 8, **kw):
    """make_llm with the small blocks the engine tests use (prompts span several blocks)."""
    return make_llm(path, block_size=block_size, **kw)
