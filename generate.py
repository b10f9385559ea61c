#!/usr/bin/env python
"""Generate completions for one or more prompts and report prefill/decode speed.

    python generate.py                                   # the default model answers a default question
    python generate.py "Name three rivers."               # a chat message, when the model has a template
    python generate.py --raw "The capital of France is"   # plain completion
    python generate.py --model /path/to/MiniCPM4-0.5B --json "Hello" "Bonjour"

Each prompt (default: "What is the capital of France?") is sent as a user message through the
model's chat template when it has one, so an instruction-tuned model answers it; --raw (or
--no-chat) completes the text as it is. Decoding is greedy unless sampling options are given or
the checkpoint's generation_config.json sets do_sample: true. Prints each completion, then one
speed line from the engine's counters, measured on the steps themselves (a shape's first call,
which also compiles its graph, is timed on a second run), with graph compilation reported apart.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

if __name__ == "__main__":
    # Before mindspore is first imported (mindcpm imports it): it reads GLOG_v then, and every
    # thread it starts inherits this signal mask (Ctrl-C handling: mindcpm/cli.py InterruptWatcher).
    os.environ.setdefault("GLOG_v", "3")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

from mindcpm import cli  # noqa: E402  (imports mindspore)

DEFAULT_PROMPT = "What is the capital of France?"
MAX_BATCH = 16


def parse_args(argv):
    p = cli.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help=f"prompts (default: {DEFAULT_PROMPT!r}, as a chat)")
    p.add_argument("--prompts-file", metavar="F",
                   help="more prompts, one per line (blank lines skipped); - reads standard input")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="send each prompt as a user message through the chat template (default: when "
                        "the model has one); --no-chat completes the prompt text as it is")
    p.add_argument("--raw", dest="chat", action="store_false", help="the same as --no-chat")
    cli.add_chat_args(p)
    cli.add_sampling_args(p, max_tokens=256)
    cli.add_model_args(p, max_num_seqs_help=f"most requests batched together (default: the number of "
                                            f"prompts, at most {MAX_BATCH})")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help="print one JSON document (results and speed) instead of text")
    out.add_argument("--output", metavar="FILE",
                     help="also write that JSON document to FILE (atomically: the complete file or none)")
    cli.add_parallel_args(p)
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        if args.prompts_file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.prompts_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        from_file = [line for line in lines if line.strip()]
        if not from_file:
            raise ValueError(f"--prompts-file {args.prompts_file}: no prompts (the file has no non-blank line)")
        prompts += from_file
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ValueError(f"prompt {i + 1} is empty")
    return prompts


def has_chat_template(llm) -> bool:
    return bool(getattr(llm.tokenizer, "chat_template", None))


def main_(argv) -> int:
    args = parse_args(argv)
    cli.check_engine_args(args)
    cli.check_output_path(args.output)
    prompts = read_prompts(args) or [DEFAULT_PROMPT]
    cli.sampling_params(args)  # bad values fail now, not after the model has loaded
    cli.launch_ranks(args, argv)
    cli.prepare_environment()

    llm = cli.llm_from_args(args, max_num_seqs=min(len(prompts), MAX_BATCH), compile_prefill=False)
    params = cli.sampling_params(args, cli.generation_defaults(llm.model_path))
    chat = has_chat_template(llm) if args.chat is None else args.chat
    if not chat and (args.system is not None or args.enable_thinking is not None):
        raise ValueError("--system, --think and --no-think need a chat template (the model has none, "
                         "or --raw / --no-chat was given)")
    if chat:
        inputs = [{"prompt_token_ids": llm.chat_prompt(cli.messages_for(p, args.system), args.enable_thinking)}
                  for p in prompts]
    else:
        inputs = prompts
    outputs = llm.generate(inputs, params)

    results = []
    for prompt, out in zip(prompts, outputs):
        c = out.outputs[0]
        results.append({"prompt": prompt, "text": c.text, "token_ids": list(c.token_ids),
                        "finish_reason": c.finish_reason, "prompt_tokens": len(out.prompt_token_ids)})
    stats = cli.stats_dict(llm, sum(r["prompt_tokens"] for r in results), sum(len(r["token_ids"]) for r in results))
    document = {
        "model": llm.model_path,
        "chat": bool(chat),
        "sampling": {k: getattr(params, k) for k in ("max_tokens", "temperature", "top_p", "top_k", "min_p",
                                                     "repetition_penalty", "seed")},
        "results": results,
        "stats": stats,
    }
    if args.output:
        cli.write_json_atomic(args.output, document)
    out = cli.result_output()
    try:
        write_results(out, document, args.json)
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def write_results(out, document: dict, as_json: bool) -> None:
    if as_json:
        import json
        print(json.dumps(document, ensure_ascii=False, indent=2), file=out, flush=True)
        return
    for r in document["results"]:
        print("\n".join("> " + line for line in r["prompt"].splitlines() or [""]), file=out)
        print(r["text"], file=out)
        if r["finish_reason"] == "length":
            print("[stopped: --max-tokens or --max-model-len reached]", file=out)
        print(file=out)
    print(cli.speed_line(document["stats"]), file=out, flush=True)


def main(argv=None) -> int:
    return cli.run(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
