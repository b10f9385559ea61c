#!/usr/bin/env python
"""Throughput benchmark: a matrix of models x precisions x batch sizes x prompt/output lengths x
paged attention on/off, each cell measured in a fresh process, printed as a table.

    python benchmark.py                                  # the default matrix, random weights, no download
    python benchmark.py --models minicpm4-0.5b -p 512 -n 128 -b 1,4 --paged on,off
    python benchmark.py --models /path/to/MiniCPM4-0.5B,model.gguf --json > results.json
    python benchmark.py -m minicpm4-8b --precision bf16 --context 8192,32768 --sparse off,current
    python benchmark.py -m minimax-lightning-small,minimax-m1-small --context 1024,32768
    python benchmark.py -m minicpm4-0.5b -n 64 --speculative-method off,oracle --oracle-acceptance 1.0,0.6

A model is a named random-weight shape (smollm2-135m, minicpm4-0.5b, minicpm4-8b, tiny-llama:
config.json only, weights drawn in memory, like vLLM's load_format="dummy"), a checkpoint
directory or a .gguf file. Each cell warms up once on its own workload (compiling every graph it
needs; reported as "compile s"), then runs it -r times with fresh random prompts: batch requests
of -p prompt tokens each, all submitted at once, each generating -n tokens (greedy, EOS ignored).
Reported: tokens/s (generated tokens per second of wall time), prefill tok/s, time to first
token, decode tok/s, inter-token latency p50/p99, peak memory of the cell's process, load and
compile time, and graphs compiled after the warm-up (should be 0). A cell that cannot fit in
memory is refused with the reason instead of run.

A speculative cell (--speculative-method ngram or oracle) runs each workload twice in turn: plain,
then with drafts; its note gives the acceptance, the mean accepted length and the decode speedup
against those paired plain runs (and against the plain row of the same workload, if any).

With --context, each cell instead times one decode step with that many tokens in the cache and a
chunked prefill of that many (long-context mode; --sparse compares InfLLM-v2 with dense).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("GLOG_v", "3")  # before mindspore is first imported

from mindcpm import bench, cli  # noqa: E402  (imports mindspore)

DEFAULT_MODELS = "smollm2-135m,minicpm4-0.5b,minicpm4-8b"


def list_arg(kind, name):
    def parse(text):
        try:
            return bench.parse_list(text, kind, name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def parse_args(argv):
    p = cli.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    m = p.add_argument_group("matrix (comma-separated lists; every combination is a row)")
    m.add_argument("-m", "--models", type=list_arg(str, "--models"), default=bench.parse_list(DEFAULT_MODELS),
                   metavar="M,..", help=f"shapes ({', '.join(bench.SHAPES)}), checkpoint directories or .gguf "
                                        f"files (default: {DEFAULT_MODELS})")
    m.add_argument("--precision", "--dtype", dest="precision", type=list_arg(bench.precision, "--precision"),
                   default=["float32"], metavar="P,..", help="float32, float16, bfloat16, or int8 / int4 (weights quantized on load; "
                        "fp32 activations) (default float32)")
    m.add_argument("-b", "--batch", type=list_arg(bench.positive_int, "--batch"), default=[1], metavar="N,..",
                   help="concurrent requests (default 1)")
    m.add_argument("-p", "--prompt-len", type=list_arg(bench.positive_int, "--prompt-len"), default=[128],
                   metavar="N,..", help="prompt tokens per request (default 128)")
    m.add_argument("-n", "--output-len", type=list_arg(bench.positive_int, "--output-len"), default=[32],
                   metavar="N,..", help="generated tokens per request (default 32)")
    m.add_argument("--paged", type=list_arg(bench.paged, "--paged"), default=[True], metavar="on,off",
                   help="paged attention: on = blocks of --block-size tokens, off = one contiguous block per "
                        "sequence (default on)")
    m.add_argument("--workload", type=list_arg(bench.workload_kind, "--workload"), default=["fixed"],
                   metavar="fixed,mixed,repeat",
                   help="fixed: `batch` requests of exactly -p/-n tokens; mixed: 4 x batch requests of random "
                        "lengths up to -p/-n through `batch` slots, so arriving prefills interleave with decodes; "
                        "repeat: as fixed, each prompt a random passage written twice (default fixed)")
    m.add_argument("--speculative-method", type=list_arg(bench.speculative_mode, "--speculative-method"),
                   default=["off"], metavar="off,ngram,oracle,eagle",
                   help="speculative decoding: off, ngram (prompt-lookup drafts; try --workload repeat), or "
                        "oracle (the target's own greedy continuation, from an untimed run without drafts, "
                        "each draft token made wrong with probability 1 - --oracle-acceptance), or eagle (a draft "
                        "head, --speculative-model)")
    m.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                   help="draft tokens verified per step with a speculative method (default 4)")
    m.add_argument("--speculative-model", default=None, metavar="DIR",
                   help="eagle: the EAGLE / EAGLE-3 draft head's directory (its architecture picks which)")
    m.add_argument("--oracle-acceptance", type=list_arg(bench.acceptance_rate, "--oracle-acceptance"),
                   default=[1.0], metavar="R,..",
                   help="oracle: the chance (0..1) that each draft token is right; a row per rate (default 1.0)")
    lc = p.add_argument_group("long context (instead of the throughput matrix)")
    lc.add_argument("--context", type=list_arg(bench.positive_int, "--context"), default=[], metavar="N,..",
                    help="context lengths: time one decode step with N tokens cached and a chunked prefill of "
                         "N tokens, e.g. 8192,16384,32768,65536")
    lc.add_argument("--sparse", type=list_arg(bench.sparse_mode, "--sparse"), default=["off"],
                    metavar="off,current,june2025",
                    help="InfLLM-v2 sparse attention for MiniCPM4 shapes: off (dense), current, june2025; "
                         "a list compares them (default off)")
    o = p.add_argument_group("run")
    o.add_argument("-r", "--repetitions", type=int, default=3, metavar="N",
                   help="measured runs per cell after the warm-up; medians are reported (default 3)")
    o.add_argument("--block-size", type=int, default=bench.PAGED_BLOCK_SIZE, metavar="B",
                   help="KV block size with paged attention on (default 16)")
    o.add_argument("--kernels", type=list_arg(bench.kernels_mode, "--kernels"), default=[None],
                   metavar="auto,on,off",
                   help="passed to LLM(kernels=...) (CPU custom kernels); a list compares them "
                        "(default: not passed, i.e. auto)")
    o.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default 0)")
    o.add_argument("--timeout", type=float, default=3600, metavar="S", help="seconds per cell (default 3600)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    out.add_argument("--output", metavar="FILE", help="also write the JSON document to FILE")
    out.add_argument("--no-progress", action="store_true", help="no progress bar (shown when stderr is a terminal)")
    return p.parse_args(argv)


def cells_from_args(args) -> list[bench.Cell]:
    for flag in ("repetitions", "block_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.num_speculative_tokens < 1:
        raise ValueError(f"--num-speculative-tokens must be >= 1, got {args.num_speculative_tokens}")
    if ("eagle" in args.speculative_method) != (args.speculative_model is not None):
        raise ValueError("--speculative-method eagle and --speculative-model DIR go together")
    models = [bench.check_model(m) for m in args.models]
    return bench.expand_matrix(models, args.precision, args.batch, args.prompt_len, args.output_len, args.paged,
                               args.workload, args.context, args.sparse, args.kernels, args.speculative_method,
                               args.oracle_acceptance, repetitions=args.repetitions, block_size=args.block_size,
                               seed=args.seed, num_speculative_tokens=args.num_speculative_tokens,
                               speculative_model=args.speculative_model)


def run_matrix(cells, progress: bool, timeout: float | None) -> list[dict]:
    from tqdm import tqdm

    rows = []
    with tqdm(total=len(cells), desc="benchmark", unit="cell", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for cell in cells:
            label = f"{cell.model} {cell.precision} b{cell.batch} p{cell.prompt_len} n{cell.output_len} " \
                    f"paged {'on' if cell.paged else 'off'} {cell.workload}"
            if cell.context:
                label = f"{cell.model} {cell.precision} context {cell.context} sparse {cell.sparse}"
            bar.set_description(label)
            rows.append(bench.measure(cell, lambda phase: bar.set_postfix_str(phase), timeout))
            bar.update(1)
    return rows


def main(argv=None) -> int:
    cli.prepare_environment()
    args = parse_args(argv)
    cli.check_output_path(args.output)
    cells = cells_from_args(args)
    env = bench.environment()
    rows = run_matrix(cells, progress=sys.stderr.isatty() and not args.no_progress, timeout=args.timeout)
    document = {"environment": env, "rows": rows}
    if args.output:
        cli.write_json_atomic(args.output, document)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(bench.report_text(rows, env))
    return 0 if all(r["status"] != "failed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(cli.run(main))
