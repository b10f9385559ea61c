#!/usr/bin/env python
"""mindcpm against llama.cpp (llama-cpp-python) and Hugging Face transformers: the same random
weights, the same prompts, the same greedy workload, on this machine. Not a test.

    python benchmarks/compare.py                                 # smollm2-135m shape, -p 128 -n 32
    python benchmarks/compare.py --model minicpm4-0.5b -p 256 -n 64 -r 3
    python benchmarks/compare.py --peers llama.cpp-f32,llama.cpp-f16
    python benchmarks/compare.py --model minicpm4-0.5b --peers mindcpm-int8,mindcpm-int4,llama.cpp-q8_0,llama.cpp-q4_0
    python benchmarks/compare.py --model minicpm4-0.5b --peers mindcpm-int8,llama.cpp-q8_0 --batch 16

The shape's weights are drawn once (N(0, 0.02^2), norms 1) and written as a Hugging Face
checkpoint (safetensors; mindcpm and transformers read it) and as GGUF files at f32, f16, q8_0 or
q4_0 (the `gguf` package; llama.cpp reads them). Each engine loads in its own process and warms up on one
request; then come -r rounds, in each of which every engine runs one request of -p random prompt
tokens generating -n tokens (the same prompt for all, the order rotating from round to round).
With --batch B each round is B such requests at once (mindcpm's continuous batching, llama.cpp's
sequences in one batch; not transformers), and the rates count the tokens of all B.
Other tenants of the machine move memory bandwidth by 10-15% within minutes, so mindcpm's ratio
to an engine (> 1: mindcpm is faster) is taken within each round; the table gives the rounds'
median and range, and each engine's median numbers.

A peer that is not installed is skipped with the command that installs it:
    pip install llama-cpp-python          # builds llama.cpp from source (several minutes)
    pip install torch transformers        # CPU wheels: --index-url https://download.pytorch.org/whl/cpu for torch
transformers has no built-in MiniCPM class, so it runs Llama shapes only.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = ("mindcpm", "mindcpm-bf16", "mindcpm-int8", "mindcpm-int4", "llama.cpp-f32", "llama.cpp-f16",
         "llama.cpp-q8_0", "llama.cpp-q4_0", "transformers")
# mindcpm-bf16: the checkpoint's matrices kept in bf16 with fp32 activations (16-bit weights on CPU);
# mindcpm-int8 / -int4: quantized on load (--quantization); llama.cpp-q8_0 / -q4_0: every matrix
# of the GGUF in that block type (gguf-py's quantizer, the same random weights).
INSTALL = {"llama.cpp": "pip install llama-cpp-python", "transformers": "pip install torch transformers"}
THREADS = int(os.environ.get("MINDCPM_COMPARE_THREADS", 0)) or os.cpu_count() or 1


# -- the shared weights and their files ----------------------------------------------------------
def hf_shapes(cfg: dict) -> dict[str, tuple]:
    """Hugging Face tensor name -> shape for a Llama/MiniCPM config."""
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    layer = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
             "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
             "mlp.down_proj": (hidden, inter), "input_layernorm": (hidden,), "post_attention_layernorm": (hidden,)}
    for i in range(cfg["num_hidden_layers"]):
        for name, shape in layer.items():
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    return shapes


def random_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Matrices ~ N(0, 0.02^2), norm weights 1 (as mindcpm's load_format="dummy" draws them)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in hf_shapes(cfg).items():
        if len(shape) == 1:
            weights[name] = np.ones(shape, np.float32)
        else:
            weights[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    return weights


def write_checkpoint(path: str, shape: str, weights: dict) -> None:
    from safetensors.numpy import save_file

    from mindcpm import bench
    os.makedirs(path, exist_ok=True)
    bench.write_shape_dir(shape, path)
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


GGUF_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, *part, _ = hf_name.split(".")
    return f"blk.{layer}.{GGUF_PARTS['.'.join(part)]}.weight"


def interleave_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp rotates interleaved pairs where Hugging Face rotates halves: its converter
    reorders the rows of q_proj/k_proj within each head."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_types(label: str):
    """(file type, matrix tensor type) of a GGUF weights label: f32, f16, q8_0 or q4_0."""
    import gguf

    return {"f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
            "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
            "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
            "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0)}[label]


def write_gguf(path: str, cfg: dict, weights: dict, tokenizer_dir: str, label: str) -> None:
    """A GGUF file llama.cpp reads: arch llama, or minicpm with its μP scales and LongRoPE factors;
    its matrices in the type of `label` (gguf_types), the norms and factors f32."""
    import gguf
    from gguf.quants import quantize

    minicpm = cfg["architectures"][0] == "MiniCPMForCausalLM"
    arch = "minicpm" if minicpm else "llama"
    heads, kv_heads, layers = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    hidden = cfg["hidden_size"]
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_block_count(layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_vocab_size(cfg["vocab_size"])
    file_type, matrix_type = gguf_types(label)
    w.add_file_type(file_type)
    if minicpm:
        w.add_embedding_scale(cfg["scale_emb"])
        w.add_residual_scale(cfg["scale_depth"] / layers ** 0.5)
        w.add_logit_scale(hidden / cfg["dim_model_base"])
        # Without the scaling type llama.cpp does not look for the LongRoPE factor tensors.
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        w.add_rope_scaling_orig_ctx_len(cfg["rope_scaling"]["original_max_position_embeddings"])
    add_tokenizer(w, tokenizer_dir, cfg["vocab_size"])
    for name, value in weights.items():
        kind = gguf_name(name).split(".")[-2]
        if kind in ("attn_q", "attn_k"):
            value = interleave_rope_rows(value, heads if kind == "attn_q" else kv_heads)
        if value.ndim == 2 and matrix_type != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), quantize(value, matrix_type), raw_dtype=matrix_type)
        else:
            w.add_tensor(gguf_name(name), value)
    if minicpm:
        scaling = cfg["rope_scaling"]
        w.add_tensor("rope_factors_long.weight", np.asarray(scaling["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(scaling["short_factor"], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add_tokenizer(w, tokenizer_dir: str, vocab_size: int) -> None:
    """The checkpoint's byte-level tokenizer as GGUF gpt2 metadata (its tokens, one merge)."""
    import gguf
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([by_id[i] for i in range(vocab_size)])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(vocab_size)])
    # llama.cpp insists on a merge list; one merge of two filler letters changes nothing here.
    w.add_token_merges(["a b"])
    w.add_bos_token_id(tok.token_to_id("<s>"))
    w.add_eos_token_id(tok.token_to_id("</s>"))
    w.add_add_bos_token(False)


# -- engines, each in its own process ------------------------------------------------------------
# Each engine loads once in a worker process and warms up on prompts[0]; the parent then runs the
# repetitions in rounds, every engine one request per round, in an order that rotates. Engines
# sharing the machine's memory bandwidth with other tenants see the same minutes, so a ratio is
# taken within each round (their median is printed), not between runs minutes apart.
def timings(ttft: float, gaps: list[float], prompt_len: int, batch: int = 1) -> dict:
    """One run's numbers from its time to the first token and the gaps between tokens (s); with
    `batch` requests in lock step, the time until all have their first token and the gaps between
    their steps, each step a token of every request."""
    total = ttft + float(np.sum(gaps))
    return {"tokens_per_second": batch * (len(gaps) + 1) / total, "ttft_ms": 1000 * ttft,
            "prefill_tokens_per_second": batch * prompt_len / ttft,
            "decode_tokens_per_second": batch * len(gaps) / float(np.sum(gaps)) if len(gaps) else 0.0,
            "gaps": [float(g) for g in gaps]}


def from_stamps(start: float, stamps: list[float]) -> tuple[float, list[float]]:
    return stamps[0] - start, np.diff(stamps).tolist()


def load_llamacpp(spec: dict):
    """-> run(prompts) -> (ttft, gaps) on llama.cpp (llama-cpp-python); one request (prompts[0])
    through its high-level generate, several through its sequences API."""
    if spec.get("batch", 1) > 1:
        return load_llamacpp_batched(spec)
    from llama_cpp import Llama

    n_ctx = spec["prompt_len"] + spec["output_len"] + 16
    n_batch = spec.get("n_batch") or max(512, spec["prompt_len"])
    llm = Llama(spec["path"], n_ctx=n_ctx, n_batch=n_batch, n_threads=THREADS,
                n_threads_batch=THREADS, verbose=False)

    def run(prompts):
        """Also keeps the greedy tokens in run.outputs[0]."""
        start, stamps, run.outputs = time.perf_counter(), [], [[]]
        for token in llm.generate(prompts[0], temp=0.0, reset=True):
            run.outputs[0].append(token)
            stamps.append(time.perf_counter())
            if len(stamps) == spec["output_len"]:
                break
        return from_stamps(start, stamps)
    return run


def load_llamacpp_batched(spec: dict):
    """-> run(prompts) -> (ttft, gaps) on llama.cpp's sequences API: each prompt is a sequence of
    one context, prefilled in n_batch chunks, then every step decodes one greedy token of each
    sequence in a single llama_decode (as llama.cpp's batched example and server do)."""
    import llama_cpp as L

    batch = spec["batch"]
    n_batch = max(spec.get("n_batch") or max(512, spec["prompt_len"]), batch)
    model = L.llama_model_load_from_file(spec["path"].encode(), L.llama_model_default_params())
    params = L.llama_context_default_params()
    params.n_ctx = batch * (spec["prompt_len"] + spec["output_len"] + 16)
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max, params.n_threads, params.n_threads_batch = batch, THREADS, THREADS
    ctx = L.llama_init_from_model(model, params)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    step_batch = L.llama_batch_init(n_batch, 0, 1)

    def decode(items):
        """items: (token, position, sequence, wants logits); -> the rows of logits, in order."""
        step_batch.n_tokens = len(items)
        for i, (token, pos, seq, logits) in enumerate(items):
            step_batch.token[i], step_batch.pos[i], step_batch.logits[i] = token, pos, logits
            step_batch.n_seq_id[i], step_batch.seq_id[i][0] = 1, seq
        if L.llama_decode(ctx, step_batch) != 0:
            raise RuntimeError("llama_decode failed")
        return [int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(vocab,)).argmax())
                for i, item in enumerate(items) if item[3]]

    def run(prompts):
        """Also keeps each sequence's greedy tokens in run.outputs."""
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        start, stamps, last = time.perf_counter(), [], []
        for seq, prompt in enumerate(prompts):
            for at in range(0, len(prompt), n_batch):
                chunk = prompt[at:at + n_batch]
                ids = decode([(t, at + i, seq, at + i == len(prompt) - 1) for i, t in enumerate(chunk)])
            last += ids
        stamps.append(time.perf_counter())
        run.outputs = [[t] for t in last]
        for step in range(spec["output_len"] - 1):
            last = decode([(t, len(p) + step, seq, True) for seq, (t, p) in enumerate(zip(last, prompts))])
            stamps.append(time.perf_counter())
            for out, t in zip(run.outputs, last):
                out.append(t)
        return from_stamps(start, stamps)
    return run


def load_transformers(spec: dict):
    """-> run(prompts) -> (ttft, gaps) on Hugging Face transformers, greedy with its KV cache (one
    request: prompts[0])."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()

    def run(prompts):
        start, stamps = time.perf_counter(), []
        with torch.inference_mode():
            out = model(torch.tensor([prompts[0]]), use_cache=True)
            while True:
                token = out.logits[0, -1].argmax().item()
                stamps.append(time.perf_counter())
                if len(stamps) == spec["output_len"]:
                    break
                out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        return from_stamps(start, stamps)
    return run


def load_mindcpm(spec: dict):
    """-> run(prompts) -> (ttft, gaps) on mindcpm, configured as benchmark.py's cell."""
    from mindcpm import bench
    from mindcpm.cli import prepare_environment
    from mindcpm.llm import LLM

    prepare_environment()
    cell = bench.Cell(model=spec["path"], precision=spec["precision"], batch=spec.get("batch", 1),
                      prompt_len=spec["prompt_len"], output_len=spec["output_len"])
    llm = LLM(model=spec["path"], **cell.llm_kwargs())

    def run(prompts):
        # The cell prefills all prompts in one step, so the requests step together: the first
        # one's gaps are the batch's.
        times = bench.timed_run(llm, [(prompt, spec["output_len"]) for prompt in prompts])
        return max(times.ttft), times.gaps[:spec["output_len"] - 1]
    return run


LOADERS = {"mindcpm": load_mindcpm, "llama.cpp": load_llamacpp, "transformers": load_transformers}


def worker_main(spec_file: str, fd: str) -> int:
    """Child entry: load the engine and warm up, then run the prompts of each `run i` line on
    stdin; every reply is one JSON line on file descriptor `fd` (the libraries own stdout)."""
    with open(spec_file) as f:
        spec = json.load(f)
    replies = os.fdopen(int(fd), "w", buffering=1)
    run = LOADERS[spec["engine"]](spec)
    run(spec["prompts"][0])
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        command, *arg = line.split()
        if command == "run":
            prompts = spec["prompts"][int(arg[0])]
            replies.write(json.dumps(timings(*run(prompts), spec["prompt_len"], len(prompts))) + "\n")
        elif command == "exit":
            replies.write(json.dumps({"peak_memory_gib": peak_rss() / 2**30}) + "\n")
            break
    return 0


def peak_rss() -> int:
    """Peak resident bytes of this process (VmHWM; ru_maxrss would include the parent's, see
    mindcpm/bench.py peak_rss, which this process must not import)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Worker:
    """The parent's handle on one engine's process."""

    def __init__(self, peer: str, spec: dict, tmp: str, threads: int):
        spec_file = os.path.join(tmp, f"{peer}.spec.json")
        with open(spec_file, "w") as f:
            json.dump(spec, f)
        read_end, write_end = os.pipe()
        env = dict(os.environ, MINDCPM_COMPARE_THREADS=str(threads), PYTHONPATH=ROOT + os.pathsep
                   + os.environ.get("PYTHONPATH", ""))
        env.setdefault("MS_COMPILER_CACHE_ENABLE", "0")  # unsafe in MindSpore 2.10 (README)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec_file,
                                      str(write_end)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace", env=env,
                                     pass_fds=(write_end,))
        os.close(write_end)  # the child's death then ends our reads
        self.replies = os.fdopen(read_end)
        self.stderr_tail: list[str] = []
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.runs: list[dict] = []
        self.failure: str | None = None

    def _read_stderr(self):
        for line in self.proc.stderr:
            if line.strip():
                self.stderr_tail[:] = (self.stderr_tail + [line.strip()])[-5:]

    def _reply(self) -> dict | None:
        line = self.replies.readline()
        if line:
            return json.loads(line)
        status = self.proc.wait()
        time.sleep(0.1)  # the stderr reader's last lines
        last = self.stderr_tail[-1:] or [f"status {status}"]
        self.failure = last[0][:300]
        return None

    def ready(self) -> bool:
        return self._reply() is not None

    def _send(self, command: str) -> None:
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # the worker died: _reply reads the end of its pipe and says why

    def run(self, index: int) -> dict | None:
        self._send(f"run {index}")
        reply = self._reply()
        if reply is not None:
            self.runs.append(reply)
        return reply

    def finish(self) -> dict:
        """The summary of the runs (medians, ITL percentiles over every gap, peak memory)."""
        self._send("exit")
        end = self._reply() or {}
        self.proc.wait()
        gaps = [g for r in self.runs for g in r["gaps"]]
        keys = [k for k in self.runs[0] if k != "gaps"]
        summary = {key: float(np.median([r[key] for r in self.runs])) for key in keys}
        summary.update(itl_p50_ms=1000 * float(np.percentile(gaps, 50)) if gaps else 0.0,
                       itl_p99_ms=1000 * float(np.percentile(gaps, 99)) if gaps else 0.0,
                       peak_memory_gib=end.get("peak_memory_gib", 0.0))
        return summary


def missing_peers(peers: list[str]) -> dict[str, str]:
    """peer -> why it is skipped."""
    missing = {}
    for peer in peers:
        module = {"llama.cpp": "llama_cpp", "transformers": "transformers"}.get(engine_of(peer))
        if module and importlib.util.find_spec(module) is None:
            key = "llama.cpp" if module == "llama_cpp" else "transformers"
            missing[peer] = f"not installed ({INSTALL[key]})"
        if module == "transformers" and importlib.util.find_spec("torch") is None:
            missing[peer] = f"torch not installed ({INSTALL['transformers']})"
    return missing


# -- the comparison ------------------------------------------------------------------------------
COLUMNS = ("engine", "weights", "prefill tok/s", "TTFT ms", "decode tok/s", "ITL p50 ms", "ITL p99 ms",
           "tokens/s", "peak mem GiB", "mindcpm decode x", "mindcpm TTFT x", "note")


LABELS = {"mindcpm": "float32", "mindcpm-bf16": "bfloat16", "mindcpm-int8": "int8", "mindcpm-int4": "int4",
          "llama.cpp-f32": "f32", "llama.cpp-f16": "f16", "llama.cpp-q8_0": "q8_0", "llama.cpp-q4_0": "q4_0",
          "transformers": "float32"}
# The mindcpm row a peer of these weights is compared with, when it ran (else plain mindcpm).
COUNTERPART = {"f16": "mindcpm-bf16", "bfloat16": "mindcpm-bf16", "q8_0": "mindcpm-int8", "int8": "mindcpm-int8",
               "q4_0": "mindcpm-int4", "int4": "mindcpm-int4"}


def engine_of(peer: str) -> str:
    return peer.split("-")[0]


def baseline(peer: str, rows: dict) -> str | None:
    """The mindcpm row a peer is compared with: the one of the same bytes per weight when it ran
    (COUNTERPART: bf16 for 16-bit peers, int8 for q8_0, int4 for q4_0), else fp32 mindcpm."""
    ours = COUNTERPART.get(LABELS[peer])
    if ours in rows:
        return ours
    return "mindcpm" if "mindcpm" in rows else None


def quantized_llamacpp(peer: str) -> bool:
    return engine_of(peer) == "llama.cpp" and LABELS[peer].startswith("q")


def start(peer: str, spec: dict, tmp: str, threads: int) -> tuple[Worker | None, str | None, str | None]:
    """(worker, failure, note) for one peer. A llama.cpp peer of quantized blocks whose load or
    warm-up crashed is started once more with n_batch 1: llama-cpp-python 0.3.36 segfaults in
    batched prefill of quantized GGUFs on Intel CPUs with AMX, and token-by-token prefill decodes
    fine; the note says so (its prefill numbers are then token by token)."""
    worker = Worker(peer, spec, tmp, threads)
    if worker.ready():
        return worker, None, None
    if not quantized_llamacpp(peer):
        return None, worker.failure, None
    log(f"{peer} crashed in batched prefill ({worker.failure}); again with n_batch 1")
    first = worker.failure
    worker = Worker(peer, dict(spec, n_batch=1), tmp, threads)
    if worker.ready():
        return worker, None, f"n_batch 1: batched prefill crashed ({first})"
    return None, worker.failure, None


def compare(args) -> list[dict]:
    from mindcpm import bench

    cfg = bench.SHAPES[args.model]
    peers = [p for p in PEERS if p in args.peers]
    skipped = missing_peers(peers)
    if "transformers" in peers and cfg["architectures"][0] != "LlamaForCausalLM":
        skipped["transformers"] = "transformers has no built-in MiniCPM class; use a Llama shape (smollm2-135m)"
    if "transformers" in peers and args.batch > 1:
        skipped["transformers"] = "runs one request at a time (--batch 1)"
    with tempfile.TemporaryDirectory(prefix="mindcpm-compare-") as tmp:
        checkpoint = os.path.join(tmp, "checkpoint")
        log(f"writing {args.model} random weights (seed {args.seed}) as safetensors and the peers' GGUFs")
        weights = random_weights(cfg, args.seed)
        write_checkpoint(checkpoint, args.model, weights)
        paths = {p: checkpoint for p in peers}
        for peer in peers:
            if engine_of(peer) == "llama.cpp" and peer not in skipped:
                paths[peer] = os.path.join(tmp, f"{peer}.gguf")
                write_gguf(paths[peer], cfg, weights, checkpoint, LABELS[peer])
        del weights
        # Flush the files just written (GBs of dirty pages): their write-back would otherwise
        # slow down whichever engine runs first.
        os.sync()
        rng = np.random.default_rng(args.seed)
        prompts = [bench.random_prompts(rng, cfg["vocab_size"], args.batch, args.prompt_len)
                   for _ in range(1 + args.repetitions)]  # the warm-up's, then one batch per round
        workers, failed, notes = {}, {}, {}
        for peer in (p for p in peers if p not in skipped):
            log(f"loading {peer}")
            spec = {"engine": engine_of(peer), "path": paths[peer], "precision": LABELS[peer], "batch": args.batch,
                    "prompts": prompts, "prompt_len": args.prompt_len, "output_len": args.output_len}
            worker, failure, note = start(peer, spec, tmp, args.threads)
            if worker:
                workers[peer] = worker
                if note:
                    notes[peer] = note
            else:
                failed[peer] = failure
        for r in range(1, args.repetitions + 1):
            live = [p for p in workers if p not in failed]
            for peer in live[r % len(live):] + live[:r % len(live)] if live else []:
                log(f"round {r}/{args.repetitions}: {peer}")
                if workers[peer].run(r) is None:
                    failed[peer] = workers[peer].failure
        rows = {}
        for peer in peers:
            row = {"engine": peer, "weights": LABELS[peer]}
            if peer in skipped:
                row.update(status="skipped", reason=skipped[peer])
            elif peer in failed:
                row.update(status="failed", reason=failed[peer])
                if peer in workers:
                    workers[peer].proc.kill()
            else:
                row.update(status="ok", reason=None, metrics=workers[peer].finish(), runs=workers[peer].runs,
                           note=notes.get(peer))
            rows[peer] = row
    add_ratios(rows)
    for row in rows.values():
        row.pop("runs", None)
    return list(rows.values())


def add_ratios(rows: dict) -> None:
    """mindcpm's ratio to each engine, per round (the rounds' median and range): decode tok/s
    ours / theirs, TTFT theirs / ours (> 1: mindcpm is faster)."""
    ok = {p: r for p, r in rows.items() if r["status"] == "ok"}
    for peer, row in ok.items():
        ours = baseline(peer, ok)
        if ours is None or ours == peer:
            continue
        pairs = list(zip(ok[ours]["runs"], row["runs"]))
        for key, name in (("decode_tokens_per_second", "decode"), ("ttft_ms", "ttft")):
            ratios = [(b[key] / a[key] if key == "ttft_ms" else a[key] / b[key]) for a, b in pairs if a[key] and b[key]]
            if ratios:
                row[f"mindcpm_{name}_x"] = {"median": float(np.median(ratios)), "min": float(min(ratios)),
                                            "max": float(max(ratios))}


def table(rows: list[dict]) -> str:
    from mindcpm import bench

    def ratio(r, name):
        x = r.get(f"mindcpm_{name}_x")
        return f"{x['median']:.2f} ({x['min']:.2f}-{x['max']:.2f})" if x else "-"

    lines = []
    for r in rows:
        m = r.get("metrics") or {}
        num = bench._num
        ok = r["status"] == "ok"
        lines.append([r["engine"], r["weights"]] + [
            num(m.get(k)) if ok else "-" for k in ("prefill_tokens_per_second", "ttft_ms", "decode_tokens_per_second",
                                                   "itl_p50_ms", "itl_p99_ms", "tokens_per_second")]
            + [num(m.get("peak_memory_gib"), 2) if ok else "-", ratio(r, "decode"), ratio(r, "ttft"),
               (r.get("note") or "") if ok else f"{r['status']}: {r['reason']}"])
    return bench.format_table(COLUMNS, lines)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/compare.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--model", default="smollm2-135m", help="a random-weight shape of benchmark.py (smollm2-135m)")
    p.add_argument("-p", "--prompt-len", type=int, default=128, help="prompt tokens (128)")
    p.add_argument("-n", "--output-len", type=int, default=32, help="generated tokens (32)")
    p.add_argument("-r", "--repetitions", type=int, default=3, help="measured runs after one warm-up (3)")
    p.add_argument("-b", "--batch", type=int, default=1, help="concurrent requests a run (1)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"engines to run ({','.join(PEERS)})")
    p.add_argument("--threads", type=int, default=THREADS,
                   help=f"threads of llama.cpp and torch ({THREADS}: the cores); on a busy machine their "
                        f"spinning thread pools suffer more than the cores' share suggests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    args.peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    unknown = [s for s in args.peers if s not in PEERS]
    if unknown:
        p.error(f"unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}")
    for flag in ("prompt_len", "output_len", "repetitions", "threads", "batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def main(argv=None) -> int:
    os.environ.setdefault("GLOG_v", "3")
    sys.path.insert(0, ROOT)
    args = parse_args(argv)
    from mindcpm import bench
    if args.model not in bench.SHAPES:
        log(f"error: unknown shape {args.model!r}; choose from {', '.join(bench.SHAPES)}")
        return 2
    rows = compare(args)
    if args.json:
        print(json.dumps({"model": args.model, "batch": args.batch, "prompt_len": args.prompt_len,
                          "output_len": args.output_len,
                          "repetitions": args.repetitions, "threads": args.threads, "rows": rows}, indent=2))
    else:
        requests = "1 request" if args.batch == 1 else f"{args.batch} concurrent requests"
        print(f"{args.model} random weights, {requests}, {args.prompt_len} prompt tokens, {args.output_len} "
              f"generated (greedy), {args.threads} threads for the peers, medians of {args.repetitions} "
              f"interleaved rounds after a warm-up")
        print(table(rows))
        print("mindcpm decode x: mindcpm's decode tok/s / the engine's; mindcpm TTFT x: the engine's TTFT / "
              "mindcpm's (> 1: mindcpm is faster); each is taken within a round, and the rounds' median (min-max) "
              "is shown. 16-bit engines are compared with mindcpm-bf16, q8_0 with mindcpm-int8 and q4_0 with "
              "mindcpm-int4 when they ran. prefill tok/s: prompt "
              "tokens (of every request) / TTFT.")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker_main(*sys.argv[2:4]))
    sys.exit(main())
