"""The throughput benchmark behind benchmark.py: model shapes with random weights, the matrix of
cells, the measurement of one cell (in its own process), and the tables.

A cell is one combination of model, precision, batch, prompt length, output length and paged
attention. The parent process never loads a model: each cell runs in a fresh child process
(`python -m mindcpm.bench CELL_JSON RESULT_FILE`) so that its peak memory (ru_maxrss) and its
compiled graphs are its own. The child warms up on the cell's workload (this compiles every
shape bucket it meets; a mixed workload repeats until a run meets no new one), then measures `repetitions` runs of the same workload with fresh random
prompts and counts the graphs compiled after the warm-up, which must be none.

Adding a shape is one entry in SHAPES: a Hugging Face config.json as a dict.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import string
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from importlib import metadata

import numpy as np

from .config import ModelConfig
from .models.eagle import draft_method
from .engine.spec_decode import NgramProposer, SpecStats, SpeculativeConfig, speculative_stats

GIB = 2**30


def _longrope_factors(first: float, last: float, n: int) -> list[float]:
    """A geometric ramp from `first` to `last`. Stand-in for the published LongRoPE lists (their
    exact values do not change the work done, only the angles)."""
    return [float(v) for v in np.geomspace(first, last, n)]


def _minicpm4(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, rms_norm_eps: float,
              factors: tuple[float, float], tie: bool, max_pos: int = 32768) -> dict:
    """A MiniCPM4 config.json (docs/minicpm4.md#mup-scales): μP scales, LongRoPE, the 73448-token vocabulary."""
    head_dim = hidden // heads
    ramp = _longrope_factors(*factors, head_dim // 2)
    return dict(architectures=["MiniCPMForCausalLM"], model_type="minicpm", hidden_size=hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                intermediate_size=intermediate, hidden_act="silu", vocab_size=73448,
                max_position_embeddings=max_pos, rms_norm_eps=rms_norm_eps,
                rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 32768,
                              "short_factor": ramp, "long_factor": ramp},
                scale_emb=12, scale_depth=1.4, dim_model_base=256, tie_word_embeddings=tie,
                bos_token_id=1, eos_token_id=[2, 73440], torch_dtype="bfloat16")


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, max_pos: int,
           rope_theta: float, tie: bool) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                intermediate_size=intermediate, hidden_act="silu", vocab_size=vocab,
                max_position_embeddings=max_pos, rms_norm_eps=1e-5,
                rope_theta=rope_theta, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                torch_dtype="bfloat16")


def _minimax(hidden: int, heads: int, head_dim: int, kv_heads: int, attn_types: tuple, experts: int, top_k: int,
             intermediate: int, vocab: int, max_pos: int) -> dict:
    """A MiniMax-M1 config.json (remote-code spelling, docs/minimax.md#configuration-spellings): attn_types 0 =
    lightning, 1 = softmax; DeepNorm alpha (2N)^(1/4) and postnorm, as in M1."""
    alpha = (2 * len(attn_types)) ** 0.25
    return dict(architectures=["MiniMaxM1ForCausalLM"], model_type="minimax_m1", hidden_size=hidden,
                num_hidden_layers=len(attn_types), num_attention_heads=heads, head_dim=head_dim,
                num_key_value_heads=kv_heads, attn_type_list=list(attn_types), hidden_act="silu",
                intermediate_size=intermediate, num_local_experts=experts, num_experts_per_tok=top_k,
                shared_intermediate_size=0, layernorm_full_attention_alpha=alpha, layernorm_full_attention_beta=1.0,
                layernorm_linear_attention_alpha=alpha, layernorm_linear_attention_beta=1.0,
                layernorm_mlp_alpha=alpha, layernorm_mlp_beta=1.0, postnorm=True, rms_norm_eps=1e-5,
                rotary_dim=head_dim // 2, rope_theta=10000000.0, max_position_embeddings=max_pos,
                vocab_size=vocab, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                torch_dtype="bfloat16")


# Named random-weight shapes: config.json of each, no checkpoint needed.
SHAPES: dict[str, dict] = {
    "smollm2-135m": _llama(576, 30, 9, 3, 1536, 49152, 8192, 100000.0, tie=True),
    "minicpm4-0.5b": _minicpm4(1024, 24, 16, 2, 4096, 1e-5, (1.0004360675811768, 49.85338592529297), tie=True),
    "minicpm4-8b": _minicpm4(4096, 32, 32, 2, 16384, 1e-6, (0.9977997200264581, 31.02392307921529), tie=False),
    # MiniCPM4-8B's layer (16 query heads per KV head, head_dim 128) four times, with LongRoPE
    # extended to 128K as for long-context use: fits in fp32 here, for the long-context mode
    # (InfLLM-v2 sparse vs dense).
    "minicpm4-8b-4layers": _minicpm4(4096, 4, 32, 2, 16384, 1e-6, (0.9977997200264581, 31.02392307921529),
                                     tie=False, max_pos=131072),
    # MiniMax-M1's layer pattern (a softmax layer after every 7 lightning layers) at a small width,
    # and the same with lightning layers only (its decode step does not grow with the context).
    "minimax-m1-small": _minimax(512, 8, 64, 2, (0,) * 7 + (1,), 8, 2, 512, 32000, 131072),
    "minimax-lightning-small": _minimax(512, 8, 64, 2, (0,) * 8, 8, 2, 512, 32000, 131072),
    # For smoke tests: seconds to compile and run.
    "tiny-llama": _llama(64, 2, 4, 2, 128, 512, 1024, 10000.0, tie=False),
}

PRECISIONS = {"float32": "float32", "fp32": "float32", "f32": "float32",
              "float16": "float16", "fp16": "float16", "f16": "float16",
              "bfloat16": "bfloat16", "bf16": "bfloat16", "int8": "int8", "int4": "int4"}
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Weight-only quantized on load (LLM(quantization=...)): bytes a weight, fp32 activations and KV cache.
QUANTIZED_BYTES = {"int8": 1.0, "int4": 0.5}
PAGED_BLOCK_SIZE = 16
KV_CACHE_GIB = 2.0  # LLM's default cache budget
LONG_CHUNK = 512  # prefill chunk of the long-context mode
PREFILL_SAMPLES = 3  # long-context prefill: chunks timed at this many offsets, then integrated
MIXED_WARMUP_RUNS = 6  # a mixed workload's warm-up: until a run compiles no new graph, at most this many
RUNTIME_OVERHEAD = 1.0 * GIB  # MindSpore, Python, graphs, activations: 0.5-1.1 GiB measured here


@dataclass
class Cell:
    model: str  # a SHAPES name, a checkpoint directory or a .gguf file
    precision: str = "float32"
    batch: int = 1  # concurrent requests (= max_num_seqs)
    prompt_len: int = 128
    output_len: int = 32
    paged: bool = True
    repetitions: int = 3
    block_size: int = PAGED_BLOCK_SIZE  # with paged on
    kernels: str | None = None  # passed to LLM(kernels=...) when given
    seed: int = 0
    # "fixed": `batch` requests of exactly prompt_len/output_len tokens. "mixed": 4 x batch
    # requests of random lengths up to those, through `batch` slots, so prefills of arriving
    # requests interleave with decodes of running ones (continuous batching in steady state).
    workload: str = "fixed"
    # Long-context mode (context > 0): the time of one decode step with `context` tokens in the
    # cache, and of a chunked prefill of that many, instead of the throughput workload.
    context: int = 0
    sparse: str = "off"  # InfLLM-v2 sparse attention: off, current or june2025 (MiniCPM4)
    speculative: str = "off"  # "ngram" / "oracle" / "eagle": num_speculative_tokens drafts a step
    speculative_model: str | None = None  # "eagle": the draft head's directory (EAGLE or EAGLE-3)
    num_speculative_tokens: int = 4
    # "oracle": the chance that each draft token is the target's own greedy token (else a wrong one).
    oracle_acceptance: float = 1.0

    @property
    def max_model_len(self) -> int:
        return self.context + LONG_CHUNK if self.context else self.prompt_len + self.output_len

    @property
    def effective_block_size(self) -> int:
        """Paged off: one block holds a whole sequence (max_model_len rounded up to 16)."""
        if self.paged:
            return self.block_size
        return -(-self.max_model_len // PAGED_BLOCK_SIZE) * PAGED_BLOCK_SIZE

    @property
    def paged_label(self) -> str:
        return f"{'on' if self.paged else 'off'} (block {self.effective_block_size})"

    def llm_kwargs(self) -> dict:
        quantized = self.precision in QUANTIZED_BYTES
        kwargs = dict(dtype="float32" if quantized else self.precision, block_size=self.effective_block_size, max_num_seqs=self.batch,
                      max_model_len=self.max_model_len, max_num_batched_tokens=max(512, self.batch * self.prompt_len),
                      kv_cache_gib=KV_CACHE_GIB, progress=False, seed=self.seed)
        if self.kernels is not None:
            kwargs["kernels"] = self.kernels
        if quantized:
            kwargs["quantization"] = self.precision
        if self.context:
            # One sequence of the whole context; its KV cache is all the budget needs.
            kwargs.update(max_num_seqs=1, max_num_batched_tokens=LONG_CHUNK, kv_cache_gib=64.0,
                          enable_prefix_caching=False)
        if self.sparse != "off":
            kwargs["sparse_attention"] = self.sparse
        if self.speculative != "off":
            # The oracle replaces the engine's proposer after loading; "ngram" gives the runner
            # its verify rows of 1 + k tokens.
            kwargs["speculative_config"] = {"method": "ngram",
                                            "num_speculative_tokens": self.num_speculative_tokens}
            if self.speculative == "eagle":
                kwargs["speculative_config"].update(method=draft_method(self.speculative_model),
                                                    model=self.speculative_model)
            # Each measured run follows a plain run of the same prompts (run_once): no prefix
            # cache, or it would skip the measured run's prefill.
            kwargs["enable_prefix_caching"] = False
        return kwargs


# -- the matrix ---------------------------------------------------------------------------------
def parse_list(text: str, kind=str, name: str = "value") -> list:
    """'a,b,c' -> [a, b, c] converted by `kind`; a one-line ValueError names a bad item."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{name}: empty list")
    out = []
    for item in items:
        try:
            value = kind(item)
        except ValueError:
            raise ValueError(f"{name}: {item!r} is not a valid value") from None
        out.append(value)
    return out


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def precision(text: str) -> str:
    if text.lower() not in PRECISIONS:
        raise ValueError
    return PRECISIONS[text.lower()]


def paged(text: str) -> bool:
    value = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}.get(text.lower())
    if value is None:
        raise ValueError
    return value


def check_model(spec: str) -> str:
    if spec in SHAPES or os.path.exists(os.path.expanduser(spec)):
        return spec
    raise ValueError(f"unknown model {spec!r}: not a path and not a shape ({', '.join(SHAPES)})")


# "repeat": like "fixed", but each prompt is a random passage written twice, text a prompt-lookup
# (n-gram) draft can copy from.
WORKLOADS = ("fixed", "mixed", "repeat")
# "oracle": drafts from the target's own greedy continuation, made wrong at a set rate (OracleProposer).
# "eagle": a draft head (--speculative-model).
SPECULATIVE_MODES = ("off", "ngram", "oracle", "eagle")


def speculative_mode(text: str) -> str:
    if text not in SPECULATIVE_MODES:
        raise ValueError
    return text


def acceptance_rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError
    return value


def workload_kind(text: str) -> str:
    if text not in WORKLOADS:
        raise ValueError
    return text


def expand_matrix(models, precisions, batches, prompt_lens, output_lens, paged_modes, workloads=("fixed",),
                  contexts=(), sparse_modes=("off",), kernel_modes=(None,), speculative_modes=("off",),
                  oracle_rates=(1.0,), **common) -> list[Cell]:
    """Every combination, model-major (the order the table shows them). With contexts, the
    long-context cells (model x precision x sparse x context) instead of the throughput ones.
    kernel_modes: LLM(kernels=...) values (None: not passed); an "oracle" speculative mode is a
    cell per rate of oracle_rates."""
    if contexts:
        return [Cell(model=m, precision=p, context=c, sparse=sp, kernels=k, **common)
                for m in models for p in precisions for sp in sparse_modes for c in contexts for k in kernel_modes]
    drafts = [(sp, rate) for sp in speculative_modes for rate in (oracle_rates if sp == "oracle" else (1.0,))]
    return [Cell(model=m, precision=p, batch=b, prompt_len=pl, output_len=ol, paged=pg, workload=w, kernels=k,
                 speculative=sp, oracle_acceptance=rate, **common)
            for m in models for p in precisions for b in batches for pl in prompt_lens for ol in output_lens
            for pg in paged_modes for w in workloads for k in kernel_modes for sp, rate in drafts]


def kernels_mode(text: str) -> str:
    if text not in ("auto", "on", "off"):
        raise ValueError(f"--kernels: {text!r} is not one of auto, on, off")
    return text


def sparse_mode(text: str) -> str:
    if text not in ("off", "current", "june2025"):
        raise ValueError(f"--sparse: {text!r} is not one of off, current, june2025")
    return text


# -- memory -------------------------------------------------------------------------------------
def parameter_count(cfg: ModelConfig) -> int:
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size \
        + 2 * cfg.hidden_size
    heads = 1 if cfg.tie_word_embeddings else 2
    return heads * cfg.vocab_size * cfg.hidden_size + cfg.num_layers * per_layer + cfg.hidden_size


def estimate_memory(cfg: ModelConfig, cell: Cell, from_checkpoint: bool) -> int:
    """Bytes the cell's process needs at its peak: the weights in the compute dtype, the KV cache,
    the transient copies made while loading, and the runtime itself."""
    dtype_bytes = BYTES.get(cell.precision, 4)
    n = parameter_count(cfg)
    largest = cfg.vocab_size * cfg.hidden_size
    # Parameters start as float64 numpy zeros; a checkpoint is also staged whole in float32.
    transient = largest * 8 + (n * 4 if from_checkpoint else 0)
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    bs = cell.effective_block_size
    kv = min(cell.batch * -(-cell.max_model_len // bs) * bs * per_token,
             max(int(KV_CACHE_GIB * GIB), -(-cell.max_model_len // bs) * bs * per_token))
    return int(n * QUANTIZED_BYTES.get(cell.precision, dtype_bytes)) + kv + transient + RUNTIME_OVERHEAD


def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _proc_kib(path: str, key: str) -> int | None:
    """The `key:  N kB` line of a /proc file, in bytes (None where the file or line is missing)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int:
    """MemAvailable (what can be used now on a shared machine), else the physical total."""
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    return total_memory() if available is None else available


def refusal(cfg: ModelConfig, cell: Cell, from_checkpoint: bool, total: int | None = None,
            available: int | None = None) -> str | None:
    """Why the cell cannot run here, in one line, or None: more than the machine has ("too big"),
    or more than is free right now (other processes hold it; running anyway would invite the
    OOM killer)."""
    needed = estimate_memory(cfg, cell, from_checkpoint)
    total = total_memory() if total is None else total
    available = available_memory() if available is None else available
    size = f"needs ~{needed / GIB:.1f} GiB in {cell.precision} ({parameter_count(cfg) / 1e9:.2f} B params)"
    if needed > total:
        return f"too big: {size}, this machine has {total / GIB:.1f} GiB"
    if needed > available:
        return f"not enough free memory now: {size}, {available / GIB:.1f} of {total / GIB:.1f} GiB free"
    return None


# -- the model of a cell ------------------------------------------------------------------------
def write_shape_dir(name: str, path: str) -> str:
    """config.json of the shape and a byte-level tokenizer covering its vocabulary."""
    cfg = SHAPES[name]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_filler_tokenizer(path, cfg["vocab_size"])
    return path


def write_filler_tokenizer(path: str, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (no merges) whose vocabulary has exactly `vocab_size` ids: the 256
    bytes, <s> </s>, then filler tokens of 2-3 printable ASCII characters. The benchmark feeds
    token ids; the fillers make every sampled id decode to text, as a real vocabulary does, so
    streaming detokenization costs what it costs with a real tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    letters = string.ascii_letters
    specials = ["<s>", "</s>"]
    fillers = (a + b + tail for a in letters for b in letters for tail in ["", *letters])
    for token in fillers:
        if len(vocab) >= vocab_size - len(specials):
            break
        vocab.setdefault(token, len(vocab))
    if len(vocab) < vocab_size - len(specials):
        raise ValueError(f"vocab_size {vocab_size} is larger than the filler tokenizer can cover")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, "add_eos_token": False}, f)


def model_kind(spec: str) -> str:
    if spec in SHAPES:
        return "random weights"
    return "gguf" if os.path.isfile(os.path.expanduser(spec)) else "checkpoint"


def shape_config(name: str) -> ModelConfig:
    return ModelConfig.from_hf(SHAPES[name], source=f"shape {name}")


# -- one cell, in the child process -------------------------------------------------------------
@dataclass
class RunTimes:
    """What one timed run of the workload saw."""
    wall: float
    ttft: list[float]  # per request, seconds from submission to its first token
    gaps: list[float]  # seconds between consecutive tokens of a request
    generated: int
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float
    compile_seconds: float  # graphs compiled during the run (none once warmed up)
    outputs: list[list[int]]  # each request's generated token ids


def timed_run(llm, requests: list[tuple[list[int], int]]) -> RunTimes:
    """All requests (prompt ids, tokens to generate) submitted at once and stepped to the end;
    a timestamp for every token (the tokens of one step share it)."""
    from .sampling import SamplingParams

    engine = llm.engine
    before = engine.stats.__dict__.copy()
    start = time.perf_counter()
    states = [engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
              for ids, n in requests]
    stamps: dict[int, list[float]] = {s.seq.seq_id: [] for s in states}
    while engine.has_unfinished():
        touched = engine.step()
        now = time.perf_counter()
        for state in touched:
            # A verified draft chain gives several tokens in one step: each is a token.
            seen = stamps[state.seq.seq_id]
            seen += [now] * (len(state.new_token_ids) - len(seen))
    wall = time.perf_counter() - start
    after = engine.stats.__dict__
    delta = {k: after[k] - before[k] for k in before}
    ttft = [t[0] - start for t in stamps.values() if t]
    gaps = [b - a for t in stamps.values() for a, b in zip(t, t[1:])]
    outputs = [s.seq.completion_token_ids for s in states]
    return RunTimes(wall, ttft, gaps, sum(len(t) for t in stamps.values()), **delta, outputs=outputs)


class OracleProposer:
    """Drafts for a benchmark of the verify step at a chosen acceptance: knows each request's
    greedy continuation (from a run without drafts) and proposes it, each draft token replaced
    by a wrong one with probability 1 - rate. Plugs in as engine.proposer, like NgramProposer.
    A chain is accepted up to its first wrong token, so the engine's acceptance rate (accepted /
    drafted) is below `rate` for rate < 1: with k drafts, sum(rate**j, j=1..k) / k."""

    def __init__(self, prompts: list[list[int]], outputs: list[list[int]], k: int, rate: float, vocab: int,
                 seed: int):
        # A request is found by its first tokens: the shortest prompt's worth (random prompts differ).
        self.key_len = min(len(p) for p in prompts)
        self.continuations = {tuple(p[:self.key_len]): p + out for p, out in zip(prompts, outputs)}
        if len(self.continuations) != len(prompts):
            raise ValueError("oracle: two requests start with the same tokens")
        self.k, self.rate, self.vocab = k, rate, vocab
        self.rng = np.random.default_rng(seed)

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        n = len(token_ids)
        truth = np.asarray(self.continuations[tuple(token_ids[:self.key_len])][n:n + min(self.k, limit)])
        wrong = self.rng.random(truth.size) >= self.rate
        # A shift by 1..vocab-1 (mod vocab) is never the true token.
        shifted = (truth + self.rng.integers(1, self.vocab, truth.size)) % self.vocab
        return np.where(wrong, shifted, truth).tolist()


def run_once(llm, cell: Cell, requests: list[tuple[list[int], int]]) -> tuple[RunTimes, RunTimes | None]:
    """One run of the requests, and for a speculative cell the plain run (no drafts) just before
    it: a baseline measured under the same load as the run it is compared with (the machine may
    be shared), and for the oracle the target's greedy continuations it proposes."""
    if cell.speculative == "off":
        return timed_run(llm, requests), None
    engine = llm.engine
    proposer, drafter = engine.proposer, engine.drafter
    engine.proposer = engine.drafter = None
    plain = timed_run(llm, requests)
    if cell.speculative == "eagle":
        engine.proposer, engine.drafter = proposer, drafter
    elif cell.speculative == "oracle":
        engine.proposer = OracleProposer([ids for ids, _ in requests], plain.outputs, cell.num_speculative_tokens,
                                         cell.oracle_acceptance, llm.config.vocab_size, cell.seed)
    else:
        engine.proposer = NgramProposer(SpeculativeConfig(**cell.llm_kwargs()["speculative_config"]))
    return timed_run(llm, requests), plain


def random_prompts(rng: np.random.Generator, vocab: int, batch: int, length: int) -> list[list[int]]:
    return [rng.integers(0, vocab, length).tolist() for _ in range(batch)]


def workload(cell: Cell, rng: np.random.Generator, vocab: int) -> list[tuple[list[int], int]]:
    """One run's requests: (prompt token ids, tokens to generate)."""
    if cell.workload == "fixed":
        return [(ids, cell.output_len) for ids in random_prompts(rng, vocab, cell.batch, cell.prompt_len)]
    if cell.workload == "repeat":
        half = max(1, cell.prompt_len // 2)
        return [(ids + ids, cell.output_len) for ids in random_prompts(rng, vocab, cell.batch, half)]
    n = 4 * cell.batch
    prompt_lens = rng.integers(max(1, cell.prompt_len // 4), cell.prompt_len + 1, n)
    output_lens = rng.integers(max(1, cell.output_len // 4), cell.output_len + 1, n)
    return [(rng.integers(0, vocab, p).tolist(), int(o)) for p, o in zip(prompt_lens, output_lens)]


def run_cell(cell: Cell, phase=lambda text: None) -> dict:
    """Loads the cell's model, warms up, measures. Returns the metrics (raises on failure)."""
    from .llm import LLM, resolve_model_path

    workdir = None
    try:
        if cell.model in SHAPES:
            workdir = tempfile.mkdtemp(prefix="mindcpm-bench-")
            path, load_format = write_shape_dir(cell.model, workdir), "dummy"
        else:
            phase("reading model")
            path, load_format = resolve_model_path(cell.model), "auto"
        cfg = ModelConfig.from_dir(path)
        reason = refusal(cfg, cell, from_checkpoint=load_format == "auto")
        if cell.context and cell.max_model_len > cfg.max_position_embeddings:
            reason = (f"context {cell.context} + a {LONG_CHUNK}-token chunk exceeds the model's "
                      f"max_position_embeddings {cfg.max_position_embeddings}")
        if reason:
            return {"status": "refused", "reason": reason}
        phase("loading weights")
        start = time.perf_counter()
        llm = LLM(model=path, load_format=load_format, **cell.llm_kwargs())
        load_seconds = time.perf_counter() - start
        if cell.context:
            return {"status": "ok", "reason": None, "dtype": llm.dtype,
                    "metrics": {**context_metrics(llm, cell, phase), "load_seconds": load_seconds,
                                "peak_memory_gib": peak_rss() / GIB}}
        runner = llm.engine.runner
        rng = np.random.default_rng(cell.seed)
        vocab = cfg.vocab_size

        phase("warm-up (compiling)")
        start = time.perf_counter()
        warm_up(llm, cell, rng, vocab)
        warmup_seconds = time.perf_counter() - start
        warm_graphs, warm_compile = len(runner.compiled_shapes), runner.compile_seconds

        llm.engine.spec_stats = SpecStats()  # the measured runs' drafts only
        runs, plain_runs = [], []
        for i in range(cell.repetitions):
            phase(f"run {i + 1}/{cell.repetitions}")
            run, plain = run_once(llm, cell, workload(cell, rng, vocab))
            runs.append(run)
            plain_runs += [plain] if plain else []
        metrics = summarize(runs, load_seconds, warmup_seconds, warm_compile, warm_graphs, runner)
        if plain_runs:
            metrics["plain_decode_tokens_per_second"] = round(float(np.median(
                [r.decode_tokens / r.decode_seconds for r in plain_runs])), 4)
        return {"status": "ok", "reason": None, "dtype": llm.dtype,
                "metrics": {**metrics, **speculative_stats(llm.engine)}}
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def warm_up(llm, cell: Cell, rng: np.random.Generator, vocab: int) -> None:
    """Runs the workload until its graphs are compiled: once for a fixed workload (every run has
    the same shapes); a mixed one's random lengths meet its (batch rows, tokens per row, cache
    blocks) buckets over several runs, so it repeats until a run compiles nothing new (at most
    MIXED_WARMUP_RUNS), as a server reaches its steady state."""
    compiled = llm.engine.runner.compiled_shapes
    for i in range(1 if cell.workload == "fixed" else MIXED_WARMUP_RUNS):
        before = len(compiled)
        run_once(llm, cell, workload(cell, rng, vocab))
        if i > 0 and len(compiled) == before:
            return


def context_metrics(llm, cell: Cell, phase=lambda text: None) -> dict:
    """Seconds of one decode step with cell.context tokens cached, and of a chunked prefill of
    that many (chunks timed at PREFILL_SAMPLES offsets, integrated). The caches (KV, compressed
    keys, lightning states) are filled with random values instead of running the prefill:
    attention's cost does not depend on them, and sparse attention still selects top-k blocks."""
    rng = np.random.default_rng(cell.seed)
    runner = llm.engine.runner
    for name, param in runner.model.parameters_and_names():
        if name.endswith(("k_cache", "v_cache", "c1_cache", "c2_cache", ".state")):
            param.set_data(_random_like(param, rng))
    step = _StepTimer(llm, cell.repetitions)
    phase(f"decode step at {cell.context}")
    decode = step(cell.context, 1)
    offsets = list(range(0, cell.context, LONG_CHUNK))
    picks = sorted({offsets[round(i * (len(offsets) - 1) / max(PREFILL_SAMPLES - 1, 1))]
                    for i in range(PREFILL_SAMPLES)})
    times = []
    for o in picks:
        phase(f"prefill chunk at {o}")
        times.append(step(o, min(LONG_CHUNK, cell.context - o)))
    return {"decode_step_ms": 1000 * decode, "prefill_seconds": float(np.interp(offsets, picks, times).sum()),
            "compile_seconds": runner.compile_seconds, "recompiles_after_warmup": 0}


def _random_like(param, rng):
    from mindspore import Tensor
    return Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.1, param.dtype)


class _StepTimer:
    """Times the compiled step for one sequence computing tokens [start, start + n), min of
    `repeats` runs after a compiling one."""

    def __init__(self, llm, repeats: int):
        self.llm, self.repeats = llm, max(1, repeats)

    def __call__(self, start: int, n: int) -> float:
        from .engine.sequence import Sequence
        from .sampling import SamplingParams
        runner, blocks = self.llm.engine.runner, self.llm.engine.scheduler.block_manager
        seq = Sequence([5] * (start + n), SamplingParams(), blocks.block_size)
        blocks.allocate(seq)
        try:
            seq.num_cached_tokens = start
            inputs, _, _ = runner.prepare([seq], [n], all_rows=False)
            runner.forward(inputs).asnumpy()  # compiles a new bucket
            best = float("inf")
            for _ in range(self.repeats):
                t = time.perf_counter()
                runner.forward(inputs).asnumpy()
                best = min(best, time.perf_counter() - t)
            return best
        finally:
            blocks.deallocate(seq)


def peak_rss() -> int:
    """Peak resident memory of this process, in bytes. VmHWM, not ru_maxrss: Linux carries a
    parent's maximum over fork/exec into the child's ru_maxrss, so a child started by a large
    parent would report at least the parent's size."""
    peak = _proc_kib("/proc/self/status", "VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if peak is None else peak


def summarize(runs: list[RunTimes], load_seconds, warmup_seconds, warm_compile, warm_graphs, runner) -> dict:
    def median(values):
        return float(np.median(values)) if values else 0.0

    gaps = [g for r in runs for g in r.gaps]
    per_run = [{
        "tokens_per_second": r.generated / r.wall,
        "prefill_tokens_per_second": r.prefill_tokens / r.prefill_seconds if r.prefill_seconds else 0.0,
        "ttft_ms": 1000 * median(r.ttft),
        "decode_tokens_per_second": r.decode_tokens / r.decode_seconds if r.decode_seconds else 0.0,
        "wall_seconds": r.wall,
    } for r in runs]
    metrics = {key: median([p[key] for p in per_run]) for key in per_run[0]}
    metrics.update({
        "itl_p50_ms": 1000 * float(np.percentile(gaps, 50)) if gaps else 0.0,
        "itl_p99_ms": 1000 * float(np.percentile(gaps, 99)) if gaps else 0.0,
        "peak_memory_gib": peak_rss() / GIB,
        "load_seconds": load_seconds,
        "warmup_seconds": warmup_seconds,
        "compile_seconds": warm_compile,
        "compiled_graphs": warm_graphs,
        "recompiles_after_warmup": len(runner.compiled_shapes) - warm_graphs,
        "compile_seconds_after_warmup": runner.compile_seconds - warm_compile,
        "runs": [{k: round(v, 4) for k, v in p.items()} for p in per_run],
    })
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}


def cell_main(argv: list[str]) -> int:
    """Child entry: run the cell in argv[0] (JSON), write the result JSON to argv[1]. Progress
    lines ('@phase <text>') go to stderr for the parent's progress bar."""
    from .cli import error_message, prepare_environment

    prepare_environment()
    cell = Cell(**json.loads(argv[0]))

    def phase(text):
        print(f"@phase {text}", file=sys.stderr, flush=True)

    try:
        result = run_cell(cell, phase)
    except (ValueError, TypeError, OSError, RuntimeError, MemoryError) as e:
        result = {"status": "failed", "reason": f"{type(e).__name__}: {error_message(e)}"}
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


# -- the parent: a cell in a subprocess ---------------------------------------------------------
def measure(cell: Cell, on_phase=lambda text: None, timeout: float | None = None) -> dict:
    """Runs the cell in a fresh process; returns its row (cell fields, status, reason, metrics)."""
    row = {**asdict(cell), "kind": model_kind(cell.model), "paged_attention": cell.paged_label,
           "status": "failed", "reason": None, "metrics": {}}
    if cell.model in SHAPES:
        reason = refusal(shape_config(cell.model), cell, from_checkpoint=False)
        if reason:
            return {**row, "status": "refused", "reason": reason}
    with tempfile.TemporaryDirectory(prefix="mindcpm-bench-") as tmp:
        result_file = os.path.join(tmp, "result.json")
        env = dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3"))
        env.setdefault("MS_COMPILER_CACHE_ENABLE", "0")  # unsafe in MindSpore 2.10 (README)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        child = asdict(cell)
        if cell.model not in SHAPES:  # the child runs in a temporary directory
            child["model"] = os.path.abspath(os.path.expanduser(cell.model))
        proc = subprocess.Popen([sys.executable, "-m", "mindcpm.bench", json.dumps(child), result_file],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
                                env=env, cwd=tmp)
        tail: list[str] = []  # the child's last other stderr lines, for the reason of a crash

        def read_stderr():
            for line in proc.stderr:
                if line.startswith("@phase "):
                    on_phase(line[len("@phase "):].strip())
                elif line.strip():
                    tail[:] = (tail + [line.strip()])[-5:]

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return {**row, "reason": f"timed out after {timeout:.0f} s"}
        reader.join()
        if os.path.isfile(result_file):
            with open(result_file) as f:
                return {**row, **json.load(f)}
        why = f"worker died with signal {-status}" if status < 0 else f"worker exited with status {status}"
        if status == -9:
            why += " (out of memory?)"
        last = next((t for t in reversed(tail) if t), "")
        return {**row, "reason": f"{why}{': ' + last[:200] if last else ''}"}


def environment() -> dict:
    """What the table's rows have in common."""
    try:
        ms_version = metadata.version("mindspore")
    except metadata.PackageNotFoundError:
        ms_version = "?"
    from .ops import detect_device
    device = "Ascend" if detect_device() == "ascend" else "CPU"
    return {"mindspore": ms_version, "device": device, "cards": 1, "cpu_count": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            "python": platform.python_version(), "machine": platform.machine()}


# -- tables -------------------------------------------------------------------------------------
SEED_COLUMNS = ("#", "model", "MindSpore", "precision", "cards", "paged attention", "batch", "pp", "tg",
                "tokens/s", "note")
DETAIL_COLUMNS = ("#", "model", "prefill tok/s", "TTFT ms", "decode tok/s", "ITL p50 ms", "ITL p99 ms",
                  "peak mem GiB", "load s", "compile s", "recompiles")


def _num(value, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def seed_rows(rows: list[dict], env: dict) -> list[list[str]]:
    """The seed's columns (model, MindSpore, precision, cards, paged attention, tokens/s) plus the
    workload; a row that did not run says why in `note`."""
    out = []
    for i, r in enumerate(rows, 1):
        ok = r["status"] == "ok"
        note = "" if ok else f"{r['status']}: {r['reason']}"
        if ok and r.get("kernels"):
            note = f"kernels {r['kernels']}"
        if ok and r.get("speculative", "off") != "off":
            note = (f"{note}; " if note else "") + speculative_note(r, rows)
        mixed = r.get("workload") == "mixed"  # lengths are maxima; 4 x batch requests share the batch
        batch = f"{r['batch']} ({4 * r['batch']} req)" if mixed else str(r["batch"])
        upto = "<=" if mixed else ""
        out.append([str(i), r["model"], env["mindspore"], r["precision"], f"{env['cards']} ({env['device']})",
                    r["paged_attention"], batch, f"{upto}{r['prompt_len']}", f"{upto}{r['output_len']}",
                    _num(r["metrics"].get("tokens_per_second")) if ok else "-", note])
    return out


# What a speculative row shares with the non-speculative row it is compared with.
SAME_WORKLOAD = ("model", "precision", "batch", "prompt_len", "output_len", "paged", "block_size", "workload",
                 "kernels", "seed")


def speculative_note(r: dict, rows: list[dict]) -> str:
    """Method, acceptance, mean accepted length, and decode tok/s against the non-speculative row
    of the same workload in this run (when there is one)."""
    m = r["metrics"]
    method = r["speculative"] + (f" {100 * r['oracle_acceptance']:.0f}%" if r["speculative"] == "oracle" else "")
    note = (f"{method} k={r['num_speculative_tokens']}: {100 * m['spec_acceptance_rate']:.0f}% accepted, "
            f"mean length {m['spec_mean_accepted_length']:.2f}")
    if m.get("plain_decode_tokens_per_second"):  # the cell's plain runs, each just before its run
        note += f", decode {m['decode_tokens_per_second'] / m['plain_decode_tokens_per_second']:.2f}x paired plain"
    for i, base in enumerate(rows, 1):
        if (base.get("speculative", "off") == "off" and base["status"] == "ok"
                and all(base.get(key) == r.get(key) for key in SAME_WORKLOAD)
                and base["metrics"].get("decode_tokens_per_second")):
            speedup = m["decode_tokens_per_second"] / base["metrics"]["decode_tokens_per_second"]
            return f"{note}, decode {speedup:.2f}x row {i}"
    return note


def detail_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for i, r in enumerate(rows, 1):
        if r["status"] != "ok":
            continue
        m = r["metrics"]
        out.append([str(i), r["model"], _num(m["prefill_tokens_per_second"]), _num(m["ttft_ms"]),
                    _num(m["decode_tokens_per_second"]), _num(m["itl_p50_ms"]), _num(m["itl_p99_ms"]),
                    _num(m["peak_memory_gib"], 2), _num(m["load_seconds"]), _num(m["compile_seconds"]),
                    str(m["recompiles_after_warmup"])])
    return out


def format_table(headers, rows) -> str:
    """A Markdown table (readable as text, pastes into an issue); numbers right-aligned."""
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]

    def is_number(text):
        try:
            float(text)
            return True
        except ValueError:
            return False

    def line(cells):
        parts = [c.rjust(w) if is_number(c) else c.ljust(w) for c, w in zip(cells, widths)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line([str(h) for h in headers]), rule, *(line(r) for r in rows)])


CONTEXT_COLUMNS = ("#", "model", "precision", "sparse", "context", "decode step ms", "decode tok/s",
                   "prefill s (est.)", "peak mem GiB", "compile s", "note")


def context_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for i, r in enumerate(rows, 1):
        ok, m = r["status"] == "ok", r["metrics"]
        out.append([str(i), r["model"], r["precision"], r.get("sparse", "off"), str(r["context"]),
                    _num(m.get("decode_step_ms")) if ok else "-",
                    _num(1000 / m["decode_step_ms"]) if ok else "-",
                    _num(m.get("prefill_seconds")) if ok else "-",
                    _num(m.get("peak_memory_gib"), 2) if ok else "-", _num(m.get("compile_seconds")) if ok else "-",
                    "" if ok else f"{r['status']}: {r['reason']}"])
    return out


def report_text(rows: list[dict], env: dict) -> str:
    long_rows = [r for r in rows if r.get("context")]
    if long_rows:
        return "\n\n".join([format_table(CONTEXT_COLUMNS, context_rows(long_rows)), (
            f"Long context: one sequence with `context` tokens in its cache (filled with random values). "
            f"decode step ms: one decode step, min of {long_rows[0].get('repetitions', '?')} runs after a "
            f"compiling one; prefill s: a chunked prefill of the whole context ({LONG_CHUNK}-token chunks, "
            f"timed at {PREFILL_SAMPLES} offsets and integrated). {env['device']}, {env['cpu_count']} cores, "
            f"MindSpore {env['mindspore']}.")])
    first = rows[0] if rows else {}
    parts = [format_table(SEED_COLUMNS, seed_rows(rows, env))]
    details = detail_rows(rows)
    if details:
        parts.append(format_table(DETAIL_COLUMNS, details))
    parts.append(
        f"tokens/s: generated tokens per second of wall time, submission to last token (prefill included). "
        f"pp/tg: prompt/generated tokens per request (<=: a mixed workload of random lengths up to "
        f"that); batch: concurrent requests. Medians of "
        f"{first.get('repetitions', '?')} runs after one warm-up run; compile s is the warm-up's graph "
        f"compilation, excluded from every rate; recompiles: graphs compiled after the warm-up. "
        f"Random-weight shapes need no checkpoint. {env['device']}, {env['cpu_count']} cores, "
        f"MindSpore {env['mindspore']}.")
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(cell_main(sys.argv[1:]))
