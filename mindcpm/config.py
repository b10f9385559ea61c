"""Model configuration: a Hugging Face config.json resolved once into the values the cells use.

Architecture differences (MiniCPM μP scales, tied heads, LongRoPE, EOS lists) are settled
here so that layers never look at raw config keys.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

logger = logging.getLogger("mindcpm")

SUPPORTED_ARCHITECTURES = ("MiniCPMForCausalLM", "LlamaForCausalLM")


class ConfigError(ValueError):
    """A checkpoint's configuration cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class RopeConfig:
    head_dim: int
    theta: float
    max_position: int
    short_factor: tuple[float, ...] | None = None  # LongRoPE only
    long_factor: tuple[float, ...] | None = None
    original_max_position: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    # μP scales; all 1.0 for Llama, which makes MiniCPM and Llama the same cells.
    embedding_scale: float = 1.0
    residual_scale: float = 1.0
    logit_scale: float = 1.0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    sparse_config: dict | None = None

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise ConfigError(f"model directory not found: {path}")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"no config.json in {path}")
        hf = _read_json(cfg_path)
        gen_path = os.path.join(path, "generation_config.json")
        gen = _read_json(gen_path) if os.path.isfile(gen_path) else {}
        return cls.from_hf(hf, gen, source=cfg_path)

    @classmethod
    def from_hf(cls, hf: dict, generation: dict | None = None, source: str = "config.json") -> "ModelConfig":
        arch = _architecture(hf, source)
        is_minicpm = arch == "MiniCPMForCausalLM"
        try:
            hidden = int(hf["hidden_size"])
            layers = int(hf["num_hidden_layers"])
            heads = int(hf["num_attention_heads"])
            kv_heads = int(hf.get("num_key_value_heads") or heads)
            head_dim = int(hf.get("head_dim") or hidden // heads)
            max_pos = int(hf.get("max_position_embeddings", 2048))
            fields = dict(
                vocab_size=int(hf["vocab_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing key {e.args[0]!r}") from None
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConfigError(f"{source}: attention_bias / mlp_bias are not supported")
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        # MiniCPM's configuration class defaults tie_word_embeddings to True (its docstring says
        # otherwise); Llama's defaults to False.
        tie = bool(hf.get("tie_word_embeddings", is_minicpm))
        scales = _minicpm_scales(hf, hidden, layers, source) if is_minicpm else {}
        return cls(
            architecture=arch,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope=_rope_config(hf, head_dim, max_pos, source),
            max_position_embeddings=max_pos,
            tie_word_embeddings=tie,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_eos_ids(hf, generation or {}),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            sparse_config=hf.get("sparse_config"),
            **scales,
            **fields,
        )


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def _architecture(hf: dict, source: str) -> str:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    named = ", ".join(archs) or f"model_type {hf.get('model_type')!r}"
    raise ConfigError(
        f"{source}: unsupported architecture {named}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _minicpm_scales(hf: dict, hidden: int, layers: int, source: str) -> dict:
    dim_model_base = hf.get("dim_model_base")
    if dim_model_base is None:
        # The official configuration class defaults dim_model_base to 1, so the final hidden
        # state is divided by hidden_size; the MiniCPM4-8B release config lacked the key and
        # produced garbled text that way.
        logger.warning(
            "%s has no dim_model_base: using the official default 1, which divides the final "
            "hidden state by hidden_size=%d; if the output is garbled, add \"dim_model_base\": 256",
            source, hidden)
        dim_model_base = 1
    return dict(
        embedding_scale=float(hf.get("scale_emb", 1.0)),
        residual_scale=float(hf.get("scale_depth", 1.0)) / math.sqrt(layers),
        logit_scale=1.0 / (hidden / float(dim_model_base)),
    )


def _rope_config(hf: dict, head_dim: int, max_pos: int, source: str) -> RopeConfig:
    theta = float(hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return RopeConfig(head_dim, theta, max_pos)
    if kind != "longrope":
        raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (default, longrope)")
    short, long = scaling.get("short_factor"), scaling.get("long_factor")
    for name, factors in (("short_factor", short), ("long_factor", long)):
        if not factors or len(factors) != head_dim // 2:
            raise ConfigError(f"{source}: rope_scaling.{name} must have head_dim/2 = {head_dim // 2} entries")
    original = int(scaling.get("original_max_position_embeddings")
                   or hf.get("original_max_position_embeddings") or max_pos)
    return RopeConfig(head_dim, theta, max_pos, tuple(map(float, short)), tuple(map(float, long)), original)


def _eos_ids(hf: dict, generation: dict) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (hf.get("eos_token_id"), generation.get("eos_token_id")):
        for i in value if isinstance(value, list) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)
