"""Model configuration: a Hugging Face config.json resolved once into the values the cells use.

Architecture differences (MiniCPM μP scales, tied heads, LongRoPE, EOS lists) are settled
here so that layers never look at raw config keys.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, replace

logger = logging.getLogger("mindcpm")

MINIMAX_ARCHITECTURES = ("MiniMaxM1ForCausalLM", "MiniMaxText01ForCausalLM", "MiniMaxForCausalLM")
SUPPORTED_ARCHITECTURES = ("MiniCPMForCausalLM", "LlamaForCausalLM") + MINIMAX_ARCHITECTURES


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
    rotary_dim: int | None = None  # partial RoPE: rotate only the first rotary_dim dims (MiniMax)
    # Positions the cos/sin tables hold: the context served (max_model_len), not the model's
    # window, which can be 10M positions (MiniMax-M1). LongRoPE still scales by the model's window.
    table_len: int | None = None

    @property
    def width(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def num_table_positions(self) -> int:
        return self.table_len or self.max_position


@dataclass(frozen=True)
class MiniMaxConfig:
    """The MiniMax-M1 / Text-01 fields (docs/minimax.md#configuration-spellings), one spelling for both the
    remote-code names (attn_type_list, layernorm_*_alpha, rotary_dim, postnorm) and the
    transformers-native ones (layer_types, *_alpha_factor, partial_rotary_factor)."""
    lightning_layers: tuple[bool, ...]  # per layer: True = lightning (linear), False = softmax
    num_experts: int
    top_k: int
    shared_intermediate_size: int
    shared_moe_mode: str
    postnorm: bool
    # DeepNorm: x1 = alpha * residual + beta * sublayer(x), per sub-layer kind (docs/minimax.md#deepnorm-residual-flow).
    linear_alpha: float
    linear_beta: float
    full_alpha: float
    full_beta: float
    mlp_alpha: float
    mlp_beta: float
    lightning_block: int = 256  # prefill block size; any value gives the same maths (docs/minimax.md#lightning-block-form)
    lightning_eps: float = 1e-6  # the RMSNorm over H*D inside the lightning layer (docs/minimax.md#lightning-output-norm-and-gate)

    @property
    def has_lightning(self) -> bool:
        return any(self.lightning_layers)


# InfLLM-v2 sparse attention (docs/minicpm4.md#sparse-config, docs/minicpm4.md#infllm-v2-overview). "current" is the MiniCPM4.1 HF code (LSE normaliser
# from C2, local window inside the top-k); "june2025" the first MiniCPM4 code (exact softmax over
# C1, window excluded from the top-k and added by the attention step).
SPARSE_VARIANTS = ("current", "june2025")
DEFAULT_SPARSE_CONFIG = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                         "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192}


@dataclass(frozen=True)
class SparseConfig:
    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    block_size: int = 64
    window_size: int = 2048
    topk: int = 64
    use_nope: bool = False
    dense_len: int = 8192  # a sequence shorter than this attends densely; -1 = always sparse
    variant: str = "current"

    @property
    def window_blocks(self) -> int:
        return self.window_size // self.block_size

    @classmethod
    def from_dict(cls, d: dict, source: str, variant: str | None = None) -> "SparseConfig":
        known = set(DEFAULT_SPARSE_CONFIG) | {"variant"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown sparse_config key(s) {', '.join(unknown)}")
        values = {**DEFAULT_SPARSE_CONFIG, **d}
        if variant is not None:
            values["variant"] = variant
        try:
            cfg = cls(**{k: (v if k in ("variant", "use_nope") else int(v)) for k, v in values.items()})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: bad sparse_config value: {e}") from None
        cfg._check(source)
        return cfg

    def _check(self, source: str) -> None:
        if self.variant not in SPARSE_VARIANTS:
            raise ConfigError(f"{source}: sparse variant {self.variant!r} unknown; choose {', '.join(SPARSE_VARIANTS)}")
        # C1 = (32, 16), C2 = (128, 64), 64-token blocks: the cache layout (one C1 entry per
        # 16-token KV block) is built on these documented values.
        if (self.kernel_size, self.kernel_stride, self.block_size) != (32, 16, 64):
            raise ConfigError(f"{source}: sparse_config kernel_size/kernel_stride/block_size must be 32/16/64 "
                              f"(the documented values), got {self.kernel_size}/{self.kernel_stride}/{self.block_size}")
        if self.use_nope:
            raise ConfigError(f"{source}: sparse_config use_nope=true is not supported")
        if self.topk < 1 or self.init_blocks < 0 or self.window_size < 0 or self.window_size % self.block_size:
            raise ConfigError(f"{source}: sparse_config needs topk >= 1, init_blocks >= 0 and window_size a "
                              f"multiple of block_size, got {self.topk}/{self.init_blocks}/{self.window_size}")
        # june2025 drops the query's own block from the top-k and adds it back only through the
        # window (docs/minicpm4.md#infllm-v2-variants): with no window a query could not see itself.
        if self.variant == "june2025" and self.window_size < self.block_size:
            raise ConfigError(f"{source}: sparse variant 'june2025' needs window_size >= block_size "
                              f"({self.block_size}), got {self.window_size}")
        if self.dense_len < -1:
            raise ConfigError(f"{source}: sparse_config dense_len must be >= 0 or -1, got {self.dense_len}")


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
    sparse_config: dict | None = None  # as written in config.json
    sparse: SparseConfig | None = None  # resolved; None = dense attention
    minimax: MiniMaxConfig | None = None

    def with_sparse(self, variant: str | bool | None) -> "ModelConfig":
        """The config with sparse attention switched on (True or a variant name; the documented
        defaults are added when config.json has no sparse_config) or off (False); None keeps it."""
        if variant is None:
            return self
        if variant is False:
            return replace(self, sparse=None)
        raw = self.sparse_config if self.sparse_config is not None else DEFAULT_SPARSE_CONFIG
        chosen = None if variant is True else variant
        return replace(self, sparse=_sparse_config(raw, self, "sparse attention option", chosen))

    def with_max_model_len(self, max_model_len: int) -> "ModelConfig":
        """The config whose per-position buffers (the RoPE tables) hold max_model_len positions."""
        return replace(self, rope=replace(self.rope, table_len=max_model_len))

    def kv_bytes_per_token(self, dtype_bytes: int, kv_heads: int | None = None) -> int:
        """K and V of one token in every layer (an upper bound for hybrid models, whose
        linear-attention layers keep a fixed-size state instead)."""
        return 2 * self.num_layers * (kv_heads or self.num_kv_heads) * self.head_dim * dtype_bytes

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        hf, cfg_path = read_config_dir(path)
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
        minimax = _minimax_config(hf, layers, source) if arch in MINIMAX_ARCHITECTURES else None
        rope = _rope_config(hf, head_dim, max_pos, source)
        if minimax is not None:
            rope = RopeConfig(head_dim, rope.theta, max_pos, rotary_dim=_rotary_dim(hf, head_dim, source))
        cfg = cls(
            architecture=arch,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope=rope,
            max_position_embeddings=max_pos,
            tie_word_embeddings=tie,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_eos_ids(hf, generation or {}),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            sparse_config=hf.get("sparse_config"),
            minimax=minimax,
            **scales,
            **fields,
        )
        if hf.get("sparse_config") is not None:
            cfg = replace(cfg, sparse=_sparse_config(hf["sparse_config"], cfg, source, None,
                                                     hf.get("_name_or_path", "")))
        return cfg


def _sparse_config(raw, cfg: "ModelConfig", source: str, variant: str | None, name: str = "") -> SparseConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: sparse_config must be an object, got {type(raw).__name__}")
    if cfg.minimax is not None:
        raise ConfigError(f"{source}: InfLLM-v2 sparse attention is MiniCPM4's; {cfg.architecture} has none")
    # The official MiniCPM4-0.5B code raises "does not support sparse attention yet" (docs/minicpm4.md#checkpoint-quirks).
    if "0.5b" in name.lower() or (cfg.architecture == "MiniCPMForCausalLM" and
                                  (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (1024, 24, 16, 2)):
        raise ConfigError(f"{source}: MiniCPM4-0.5B does not support sparse attention (the official code refuses it too)")
    group = cfg.num_heads // cfg.num_kv_heads
    if group < 16 and 16 % group:
        raise ConfigError(f"{source}: sparse attention repeats each KV group's query heads up to 16, "
                          f"which needs a group size dividing 16, got {group}")
    return SparseConfig.from_dict(raw, source, variant)


def read_config_dir(path: str, what: str = "model") -> tuple[dict, str]:
    """(config.json of the `what` directory at path, the file's path)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ConfigError(f"{what} directory not found: {path}")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"no config.json in {path}")
    return _read_json(cfg_path), cfg_path


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


def _minimax_config(hf: dict, layers: int, source: str) -> MiniMaxConfig:
    """Both spellings, tried in vLLM's order (docs/minimax.md#configuration-spellings): attn_type_list, decoder_attention_types,
    layer_types; layernorm_*_alpha before *_alpha_factor."""
    kinds = hf.get("attn_type_list") or hf.get("decoder_attention_types")
    if kinds is not None:
        lightning = [int(k) == 0 for k in kinds]
    elif hf.get("layer_types") is not None:
        names = {"linear_attention": True, "full_attention": False}
        bad = [t for t in hf["layer_types"] if t not in names]
        if bad:
            raise ConfigError(f"{source}: layer_types entry {bad[0]!r} is not linear_attention or full_attention")
        lightning = [names[t] for t in hf["layer_types"]]
    else:
        raise ConfigError(f"{source}: MiniMax config needs attn_type_list or layer_types")
    if len(lightning) != layers:
        raise ConfigError(f"{source}: {len(lightning)} layer types for num_hidden_layers {layers}")

    def factor(remote: str, native: str) -> float:
        value = hf.get(remote, hf.get(native))
        return 1.0 if value is None else float(value)

    shared = hf.get("shared_intermediate_size") or 0
    if isinstance(shared, list):
        if len(set(shared)) > 1:
            raise ConfigError(f"{source}: per-layer shared_intermediate_size {shared} is not supported")
        shared = shared[0] if shared else 0
    mode = hf.get("shared_moe_mode", "sigmoid")
    if shared and mode != "sigmoid":
        raise ConfigError(f"{source}: shared_moe_mode {mode!r} is not supported (sigmoid)")
    try:
        experts, top_k = int(hf["num_local_experts"]), int(hf["num_experts_per_tok"])
    except KeyError as e:
        raise ConfigError(f"{source}: missing key {e.args[0]!r}") from None
    if not 0 < top_k <= experts:
        raise ConfigError(f"{source}: num_experts_per_tok {top_k} must be in 1..num_local_experts {experts}")
    # The transformers-native class hard-codes the postnorm flow and has no such field (docs/minimax.md#configuration-spellings).
    postnorm = bool(hf.get("postnorm", hf.get("model_type") == "minimax"))
    return MiniMaxConfig(
        lightning_layers=tuple(lightning), num_experts=experts, top_k=top_k,
        shared_intermediate_size=int(shared), shared_moe_mode=mode, postnorm=postnorm,
        linear_alpha=factor("layernorm_linear_attention_alpha", "linear_attn_alpha_factor"),
        linear_beta=factor("layernorm_linear_attention_beta", "linear_attn_beta_factor"),
        full_alpha=factor("layernorm_full_attention_alpha", "full_attn_alpha_factor"),
        full_beta=factor("layernorm_full_attention_beta", "full_attn_beta_factor"),
        mlp_alpha=factor("layernorm_mlp_alpha", "mlp_alpha_factor"),
        mlp_beta=factor("layernorm_mlp_beta", "mlp_beta_factor"),
        lightning_block=int(hf.get("block_size") or hf.get("block") or 256))


def _rotary_dim(hf: dict, head_dim: int, source: str) -> int:
    """rotary_dim (remote code), else partial_rotary_factor (top level or rope_parameters)."""
    if hf.get("rotary_dim"):
        dim = int(hf["rotary_dim"])
    else:
        factor = hf.get("partial_rotary_factor") or (hf.get("rope_parameters") or {}).get("partial_rotary_factor")
        if factor is None:
            logger.warning("%s gives neither rotary_dim nor partial_rotary_factor: RoPE rotates the whole "
                           "head; MiniMax-M1/Text-01 were trained with rotary_dim = head_dim/2", source)
        dim = int(round(float(factor or 1.0) * head_dim))
    if dim <= 0 or dim > head_dim or dim % 2:
        raise ConfigError(f"{source}: rotary_dim {dim} must be even and in 2..head_dim {head_dim}")
    return dim


def _eos_ids(hf: dict, generation: dict) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (hf.get("eos_token_id"), generation.get("eos_token_id")):
        for i in value if isinstance(value, list) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)
