#!/usr/bin/env python
"""Chat with a model: multi-turn, streamed answers, history kept across turns.

    python chat.py                                    # the default model (SmolLM2-135M-Instruct)
    python chat.py --model /path/to/MiniCPM4.1-8B --think
    printf 'Hi!\\nWhat did I just say?\\n' | python chat.py   # works over a pipe too

One line is one message. Commands: /reset clears the history (the --system message stays),
/exit (or end of input) quits. Ctrl-C while an answer streams stops that answer and returns to
the prompt; Ctrl-C at the prompt quits. When a turn fails (for instance the conversation no
longer fits in --max-model-len) the error is printed and the chat goes on; over a pipe the exit
status is then 1.
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

PROMPT = "you> "


def parse_args(argv):
    p = cli.ArgumentParser(prog="chat.py", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    cli.add_chat_args(p)
    cli.add_sampling_args(p, max_tokens=1024)
    cli.add_model_args(p, max_num_seqs_help="most requests batched together (default: 1; a chat has one)")
    return p.parse_args(argv)


def read_message(interactive: bool) -> str | None:
    """The next line the user typed, without its newline; None at end of input."""
    if interactive:
        try:
            return input(PROMPT)
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def stream_answer(llm, token_ids: list[int], params) -> tuple[str, bool]:
    """Streams one answer to stdout. Returns (answer text, completed). Ctrl-C stops the answer
    after the current engine step: closing the stream aborts the request and frees its blocks."""
    text, completed = "", False
    with cli.INTERRUPTS.deferred() as interrupt:
        stream = llm.stream({"prompt_token_ids": token_ids}, params)
        try:
            for out in stream:
                if out.delta:
                    sys.stdout.write(out.delta)
                    sys.stdout.flush()
                    text += out.delta
                if out.finished:
                    text, completed = out.outputs[0].text, True
                if interrupt.requested:
                    break
        except KeyboardInterrupt:  # when no watcher runs (chat.main called from Python)
            pass
        finally:
            stream.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not completed:
        print("[answer stopped]", file=sys.stderr, flush=True)
    return text, completed


def main_(argv) -> int:
    args = parse_args(argv)
    cli.check_engine_args(args)
    cli.sampling_params(args)  # bad values fail now, not after the model has loaded
    cli.prepare_environment()
    interactive = sys.stdin.isatty()

    llm = cli.llm_from_args(args, max_num_seqs=1, compile_prefill=False)
    params = cli.sampling_params(args, cli.generation_defaults(llm.model_path))
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    failed = 0
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        name = args.model or "the default model, SmolLM2-135M-Instruct"
        print(f"chatting with {name}\n/reset clears the history, /exit quits, Ctrl-C stops an answer",
              file=sys.stderr, flush=True)
    while True:
        line = read_message(interactive)
        if line is None:
            break
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history.clear()
            if interactive:
                print("[history cleared]", file=sys.stderr, flush=True)
            continue
        turn = history + [{"role": "user", "content": line}]
        try:
            token_ids = llm.chat_prompt(system + turn, args.enable_thinking)
            answer, _ = stream_answer(llm, token_ids, params)
        except BrokenPipeError:
            raise  # the reader of our output left: end quietly (cli.run)
        except cli.EXPECTED_ERRORS as e:
            # The conversation goes on: most often the history no longer fits the context.
            hint = "; /reset clears the history" if history else ""
            print(f"error: {cli.error_message(e)}{hint}", file=sys.stderr, flush=True)
            failed += 1
            continue
        if answer:  # a stopped answer is kept as far as it came; an empty one drops the turn
            history = turn + [{"role": "assistant", "content": answer}]
    return 1 if failed and not interactive else 0


def main(argv=None) -> int:
    return cli.run(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
