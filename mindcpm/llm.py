"""The user-facing class, in the shape vLLM users know: LLM(...).generate / .chat / .stream."""
from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import mindspore as ms

from .config import ModelConfig
from .engine.llm_engine import LLMEngine, RequestState
from .engine.runner import ModelRunner, RunnerConfig
from .engine.scheduler import Scheduler
from .engine.spec_decode import SpeculativeConfig
from .models.eagle import draft_config
from .ops import setup_runtime
from .parallel import all_ranks_or_none, init_tensor_parallel, kv_heads_per_rank
from .sampling import SamplingParams
from .tokenizer import Tokenizer

logger = logging.getLogger("mindcpm")

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# "auto": the checkpoint's weights; "dummy": random weights of the config's shapes (benchmarks:
# only config.json and a tokenizer are read).
LOAD_FORMATS = ("auto", "dummy")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id; None for EOS or length


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list | None = None
    delta: str = ""  # streaming: the text added since the previous output of this request
    metrics: dict = field(default_factory=dict)


def resolve_model_path(model: str | None) -> str:
    """A checkpoint directory, a .gguf file (converted once and cached), or None for the default."""
    from .gguf import default_model_path, gguf_to_hf_dir
    path = default_model_path() if model is None else os.path.expanduser(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model not found: {path}")
    if os.path.isfile(path):
        return gguf_to_hf_dir(path)
    return path


def check_speculation(speculative: SpeculativeConfig | None, cfg: ModelConfig) -> None:
    """Draft chains roll back by not advancing a sequence's cached length: that cannot undo a
    linear-attention state (MiniMax) or InfLLM-v2's block summaries."""
    if speculative is None:
        return
    if cfg.minimax is not None:
        raise ValueError(f"speculative decoding is not supported for {cfg.architecture} (its linear-attention "
                         f"state cannot roll back rejected drafts)")
    if cfg.sparse is not None:
        raise ValueError("speculative decoding is not supported with InfLLM-v2 sparse attention")


def resolve_kernels(setting: str, device: str = "cpu") -> bool:
    """The CPU custom kernels: "auto" = on when the device is the CPU and g++ builds them."""
    from .ops.cpu_kernels import kernels_requested
    if device == "ascend":
        if setting == "on":
            raise ValueError("kernels='on' selects the CPU kernels, but the device is Ascend")
        return False
    return kernels_requested(setting)


def resolve_dtype(dtype: str, cfg: ModelConfig, kernels: bool = False, device: str = "cpu") -> tuple[str, str | None]:
    """(compute dtype, weight dtype or None when the weights are in the compute dtype).
    On CPU, bfloat16/float16 mean 16-bit weights with fp32 activations through the kernels."""
    if dtype == "auto":
        # MindSpore's CPU ops have no bf16 compute and fp16 GEMV is slow there: fp32 on CPU.
        if device != "ascend":
            return "float32", None
        return ("float16" if cfg.torch_dtype == "float16" else "bfloat16"), None
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    if device == "ascend" or dtype == "float32":
        return dtype, None
    if kernels:
        return "float32", dtype
    if dtype == "bfloat16":
        raise ValueError("bfloat16 on CPU needs the CPU kernels (kernels off or no g++); use --dtype float32")
    return dtype, None  # fp16 compute with MindSpore's own CPU ops


def resolve_quantization(asked: str | None, path: str, kernels: bool, detect: bool = True) -> str | None:
    """The quantization the model runs: "gptq" for a GPTQ checkpoint; `asked`; or for an imported GGUF whose projections are
    all in block types with a kernel (Q8_0 / Q4_0 / Q4_1), "gguf" (its blocks kept as they are).
    Otherwise the dequantized fp32 weights, with a one-line notice saying why. Unasked, a
    checkpoint whose first projection is ternary runs as "bitcpm" (detect: probe the checkpoint;
    False when its weights are not loaded)."""
    from .gguf import QUANTIZATION_INFO
    from .quant.gptq import read_config
    if read_config(path) is not None:  # a GPTQ checkpoint runs as it is quantized, or not at all
        if asked not in (None, "gptq"):
            raise ValueError(f"{path} is a GPTQ checkpoint, already quantized; leave quantization unset")
        if not kernels:
            raise ValueError("GPTQ checkpoints run on the CPU kernels, which are off")
        return "gptq"
    if asked == "gptq":
        raise ValueError(f"quantization 'gptq': {path} has no quantization_config or quantize_config.json")
    info_file = os.path.join(path, QUANTIZATION_INFO)
    if asked not in (None, "gguf") or not os.path.isfile(info_file):
        if asked == "gguf":
            raise ValueError(f"quantization 'gguf' needs a .gguf model; {path} is not one")
        if asked == "bitcpm" and not kernels:
            raise ValueError("quantization 'bitcpm' runs on the CPU kernels, which are off "
                             "(--kernels off, no g++, or another device)")
        return detect_bitcpm(path, kernels) if asked is None and detect else asked
    with open(info_file, encoding="utf-8") as f:
        info = json.load(f)
    from .quant.gguf_blocks import BLOCK_TYPES, kept_quantized
    types = "/".join(t for t in info["projection_types"] if not kept_quantized(t))
    why = None if info["kept"] else info.get("mixed_fused") or \
        f"its projections' GGUF type {types} has no quantized kernel ({', '.join(BLOCK_TYPES)})"
    if why is None and not kernels:
        why = "the CPU kernels are off"
    if why is None:
        return "gguf"
    if asked == "gguf":
        raise ValueError(f"cannot keep this GGUF model quantized: {why}")
    logger.warning("running the GGUF model's dequantized fp32 weights: %s", why)
    return None


def detect_bitcpm(path: str, kernels: bool) -> str | None:
    """"bitcpm" for a checkpoint that looks like BitCPM (quant/bitcpm.probe_checkpoint), with a
    one-line notice; its float weights where the kernels that run 2-bit codes are off."""
    from .quant.bitcpm import probe_checkpoint
    found = probe_checkpoint(path)
    if found is None:
        return None
    name, group = found
    if not kernels:
        logger.warning("%s is ternary (BitCPM) but runs as float weights: the CPU kernels that run "
                       "2-bit codes are off", name)
        return None
    logger.warning("%s is ternary in groups of %d: running the checkpoint as BitCPM, its projections "
                   "packed to 2 bits (quantization='bitcpm')", name, group)
    return "bitcpm"


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", block_size: int = 16,
                 max_num_seqs: int = 16, max_model_len: int | None = None,
                 max_num_batched_tokens: int | None = None, kv_cache_gib: float = 2.0,
                 enable_prefix_caching: bool = True, attention: str | None = None, progress: bool = True,
                 kernels: str = "auto", tensor_parallel_size: int = 1, enable_expert_parallel: bool = False,
                 load_format: str = "auto", seed: int = 0, sparse_attention: bool | str | None = None,
                 speculative_config: dict | None = None, compile_prefill: bool = True,
                 quantization: str | None = None, quant_group_size: int | None = None):
        """sparse_attention: None follows config.json's sparse_config; True (or a variant,
        "current" / "june2025") switches InfLLM-v2 on, adding the documented default sparse_config
        when config.json has none; False switches it off.

        attention: "native" or "ascend" (None: the device's own; the environment variable
        MINDCPM_ATTENTION overrides it). "ascend" on a CPU host is for tests with CPU stand-ins
        of the Ascend kernels.

        speculative_config: vLLM's, e.g. {"method": "ngram", "num_speculative_tokens": 4,
        "prompt_lookup_max": 4, "prompt_lookup_min": 1} (engine/spec_decode.py).

        compile_prefill=False runs prefill steps op by op instead of compiling a graph per prompt
        shape, and decode steps op by op until a bucket has run long enough to pay for its graph,
        where the CPU kernels allow it: a faster start for one-shot and interactive use, a slower
        prefill of long prompts (ops/device.py Device.eager_steps).


        quantization: "int8" (per output channel by default) or "int4" (groups of 128 inputs by
        default; quant_group_size picks another): the projections' weights are quantized group-wise
        by round-to-nearest as they load, one at a time, and run on the CPU kernels. "bitcpm": a
        BitCPM checkpoint's ternary weights, verified and packed to 2 bits. GPTQ checkpoints, BitCPM
        checkpoints (layer 0's q_proj exactly ternary) and GGUF files whose projections are Q8_0 /
        Q4_0 / Q4_1 run their own codes without asking."""
        from .ops.device import QUANTIZATIONS
        if quantization not in (None, *QUANTIZATIONS):  # an unknown name fails before any work
            raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"unknown load_format {load_format!r}; choose {', '.join(LOAD_FORMATS)}")
        device = setup_runtime()
        attention = attention or os.environ.get("MINDCPM_ATTENTION") or None
        tp = init_tensor_parallel(tensor_parallel_size, enable_expert_parallel)
        with all_ranks_or_none():  # one rank's bad input stops every rank
            path = resolve_model_path(model)
            self.model_path = path
            self.config = ModelConfig.from_dir(path).with_sparse(sparse_attention)
            speculative = SpeculativeConfig.from_dict(speculative_config)
            check_speculation(speculative, self.config)
            if speculative is not None and speculative.uses_draft_model and tp.size > 1:
                raise ValueError("EAGLE draft heads with tensor parallelism are not supported yet")
            # A draft head that does not fit the target fails before anything is loaded.
            draft = draft_config(speculative.model, self.config, speculative.method) \
                if speculative is not None and speculative.uses_draft_model else None
            self.tokenizer = Tokenizer.from_dir(path)
            self.kernels = resolve_kernels(kernels, device) and (attention or "native") == "native"
            self.dtype, self.weight_dtype = resolve_dtype(dtype, self.config, self.kernels, device)
            self.quantization = quantization = resolve_quantization(
                quantization, path, self.kernels, detect=load_format == "auto")
            max_model_len = self._max_model_len(max_model_len, block_size, kv_cache_gib)
            self.config = self.config.with_max_model_len(max_model_len)
            if speculative is not None and speculative.num_speculative_tokens >= max_model_len:
                raise ValueError(f"{speculative.num_speculative_tokens} draft tokens per step do not fit "
                                 f"max_model_len {max_model_len}")
            max_num_batched_tokens = max_num_batched_tokens or max(512, max_num_seqs)
            num_blocks = self._num_blocks(block_size, max_num_seqs, max_model_len, kv_cache_gib)
            eos = set(self.config.eos_token_ids) or {self.tokenizer.eos_token_id}
            runner_cfg = RunnerConfig(block_size, num_blocks, max_num_seqs, max_model_len, DTYPES[self.dtype],
                                      attention, self.kernels, DTYPES.get(self.weight_dtype), device,
                                      speculative.num_speculative_tokens if speculative else 0,
                                      compile_prefill, quantization, quant_group_size,
                                      **(draft.target_hidden() if draft is not None else {}))
            dummy = load_format == "dummy"
            runner = ModelRunner(self.config, runner_cfg, None if dummy else path, eos, progress)
            if dummy:
                runner.load_dummy_weights(seed)
        if tp.rank != 0:
            # A worker rank only runs the steps rank 0 sends; its process ends with rank 0's.
            runner.serve()
            sys.exit(0)
        atexit.register(runner.close)
        # A linear-attention state sums its whole prefix: no prefix sharing for such models.
        scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, max_model_len, num_blocks, block_size, eos,
                              enable_prefix_caching and not runner.num_state_slots, runner.num_state_slots)
        self.engine = LLMEngine(runner, scheduler, self.tokenizer, speculative)
        self.max_model_len = max_model_len

    def _max_model_len(self, asked: int | None, block_size: int, gib: float) -> int:
        """`asked` (at most the model's context); by default the model's context when one sequence
        of it fits the KV-cache budget, else the longest that does, with a one-line notice."""
        context = self.config.max_position_embeddings
        if asked is not None:
            return min(asked, context)
        per_token = self.config.kv_bytes_per_token(BYTES[self.dtype], kv_heads_per_rank(self.config.num_kv_heads))
        fits = max(int(gib * 2**30) // (per_token * block_size), 1) * block_size
        if context <= fits:
            return context
        logger.warning("max_model_len is %d, not the model's context of %d tokens: one sequence that long "
                       "needs %.1f GiB of KV cache, more than kv_cache_gib=%g (set max_model_len / "
                       "--max-model-len to choose)", fits, context, context * per_token / 2**30, gib)
        return fits

    def _num_blocks(self, block_size: int, max_num_seqs: int, max_model_len: int, gib: float) -> int:
        c = self.config
        per_block = block_size * c.kv_bytes_per_token(BYTES[self.dtype], kv_heads_per_rank(c.num_kv_heads))
        wanted = max_num_seqs * -(-max_model_len // block_size)
        budget = max(int(gib * 2**30) // per_block, -(-max_model_len // block_size))
        return min(wanted, budget)

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    # -- requests -------------------------------------------------------------------------
    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return None, [int(t) for t in prompt["prompt_token_ids"]]
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def check_prompt(self, ids: list[int]) -> None:
        """ValueError naming the problem when the prompt cannot run: an id outside the
        vocabulary, or no room left in max_model_len for a generated token."""
        vocab = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}")

    def _add(self, prompts, params) -> list[RequestState]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        encoded = [self._encode(p) for p in prompts]
        for _, ids in encoded:
            self.check_prompt(ids)
        states = []
        try:
            for (text, ids), p in zip(encoded, params_list):
                states.append(self.engine.add_request(ids, p, text))
        except ValueError:
            for s in states:
                self.engine.abort(s.seq.seq_id)
            raise
        return states

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        states = self._add(prompts, sampling_params)
        start = time.perf_counter()
        while any(not s.finished for s in states):
            self.engine.step()
        elapsed = time.perf_counter() - start
        return [self._output(s, {"elapsed": elapsed}) for s in states]

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields a RequestOutput each time the request's visible text grows, the last one finished.
        Closing the generator early aborts the request."""
        (state,) = self._add(prompt, sampling_params)
        try:
            while not state.finished:
                self.engine.step()
                delta = state.visible_text[state.emitted:]
                if delta or state.finished:
                    state.emitted += len(delta)
                    yield self._output(state, {}, delta)
        finally:
            if not state.finished:
                self.engine.abort(state.seq.seq_id)
                state.finished = True

    def chat_prompt(self, messages: list[dict], enable_thinking: bool | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  enable_thinking=enable_thinking)
        return self.tokenizer.encode_chat(text)

    def chat(self, messages, sampling_params=None, enable_thinking: bool | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [{"prompt_token_ids": self.chat_prompt(c, enable_thinking, add_generation_prompt)}
                   for c in conversations]
        return self.generate(prompts, sampling_params)

    def _output(self, state: RequestState, metrics: dict, delta: str = "") -> RequestOutput:
        seq = state.seq
        text = state.text if state.finished else state.visible_text
        lps = seq.logprobs if seq.params.logprobs is not None else None
        cumulative = sum(e[t] for e, t in zip(lps, seq.completion_token_ids)) if lps else None
        completion = CompletionOutput(0, text, list(seq.completion_token_ids), seq.finish_reason, lps, cumulative,
                                      state.stop_reason)
        return RequestOutput(seq.seq_id, state.prompt, list(seq.prompt_token_ids), [completion], state.finished,
                             seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None, delta,
                             metrics)
