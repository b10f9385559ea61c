"""generate.py and chat.py as users run them: subprocesses in an empty working directory, on a
tiny random Llama checkpoint (one per module). Most bad-input cases call the scripts' `main` in
this process, through the same error boundary; a representative few run as subprocesses.
chat.py's turn logic (history, /reset, stopping an answer, failing turns) is checked in-process
against a fake LLM.

The subprocesses run with MindSpore's compile cache off: it keys cached graphs by compilation
order, not input shapes (README, Known limits).
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from mindcpm import cli
from mindcpm.llm import CompletionOutput, RequestOutput
from tests.tiny import broken_copies, make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEED_LINE = re.compile(r"^speed: (\d+) prompt tokens, prefill [\d.]+ tok/s, decode [\d.]+ tok/s \(.*compile time excluded\)$")


def _load_script(name: str):
    """Imports generate.py / chat.py as modules (their __main__-only preamble does not run)."""
    spec = importlib.util.spec_from_file_location(f"mindcpm_script_{name}", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_script("generate")
chat = _load_script("chat")


def _env() -> dict:
    env = dict(os.environ, MS_COMPILER_CACHE_ENABLE="0", GLOG_v="3")
    env.pop("MS_COMPILER_CACHE_PATH", None)
    return env


def run_script(script: str, *args: str, cwd, stdin: str | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=str(cwd), env=_env(),
                          input=stdin if stdin is not None else "", capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout)


def assert_one_error_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_cli")))


@pytest.fixture(scope="module")
def bad_models(tiny, tmp_path_factory) -> dict:
    """Broken copies of the tiny checkpoint (tests/tiny.py), and draft heads that do not fit it."""
    root = tmp_path_factory.mktemp("bad_models")
    models = broken_copies(tiny, str(root))
    from tests.models.test_eagle import make_draft
    for name, change in (("draft_arch", {"architectures": ["LlamaForCausalLM"]}), ("draft_hidden", {"hidden_size": 32}),
                         ("draft_vocab", {"vocab_size": 100})):
        models[name] = os.path.join(str(root), name)
        make_draft(models[name], own_vocab=False)
        with open(os.path.join(models[name], "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(models[name], "config.json"), "w") as f:
            json.dump({**cfg, **change}, f)
    return models


@pytest.fixture(scope="module")
def chat_reference(tiny, tmp_path_factory) -> dict:
    """generate.py --chat --json: each prompt alone as a one-message conversation."""
    cwd = tmp_path_factory.mktemp("gen_json")
    proc = run_script("generate.py", "--model", tiny, "--chat", "--json", "--max-tokens", "6",
                      "--max-num-seqs", "1", "Hello", "How are you?", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.listdir(cwd) == [], "the working directory must stay clean"
    return json.loads(proc.stdout)


# -- generate.py --------------------------------------------------------------------------------
def test_generate_prints_completions_and_one_speed_line(tiny, tmp_path):
    out_file = tmp_path / "out.json"
    proc = run_script("generate.py", "--model", tiny, "--max-tokens", "5", "--output", str(out_file),
                      "Hello", "Good morning", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert "> Hello" in lines and "> Good morning" in lines
    speed = [line for line in lines if line.startswith("speed:")]
    assert len(speed) == 1 and SPEED_LINE.match(speed[0]), proc.stdout
    document = json.loads(out_file.read_text(encoding="utf-8"))
    results = document["results"]
    assert [r["prompt"] for r in results] == ["Hello", "Good morning"]
    for r in results:
        assert 1 <= len(r["token_ids"]) <= 5 and r["finish_reason"] in ("stop", "length")
        assert r["text"] in proc.stdout
    assert int(SPEED_LINE.match(speed[0]).group(1)) == sum(r["prompt_tokens"] for r in results)
    assert document["stats"]["decode_tokens"] > 0
    assert sorted(os.listdir(tmp_path)) == ["out.json"], "no temporary files or MindSpore litter"


def test_generate_with_ngram_drafts_reports_acceptance(tiny, tmp_path, capsys):
    """Greedy text with n-gram drafting equals the plain run's; the speed line and the stats
    carry the acceptance rate and the mean accepted length."""
    prompt = "abcabcabcabcabc"
    common = ["--model", tiny, "--max-tokens", "24", "--json"]
    assert generate.main(common + [prompt]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert generate.main(common + ["--speculative-method", "ngram", "--num-speculative-tokens", "3", prompt]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert [r["token_ids"] for r in spec["results"]] == [r["token_ids"] for r in plain["results"]]
    stats = spec["stats"]
    assert stats["spec_draft_tokens"] >= stats["spec_accepted_tokens"] > 0
    assert stats["spec_acceptance_rate"] == round(stats["spec_accepted_tokens"] / stats["spec_draft_tokens"], 4)
    assert re.search(r"drafts accepted [\d.]+%, mean accepted length [\d.]+$", cli.speed_line(stats))


def test_generate_json_is_one_document(chat_reference):
    doc = chat_reference
    assert doc["chat"] is True and doc["sampling"]["temperature"] == 0.0
    assert [r["prompt"] for r in doc["results"]] == ["Hello", "How are you?"]
    for r in doc["results"]:
        assert {"prompt", "text", "token_ids", "finish_reason"} <= set(r)
        assert all(isinstance(t, int) for t in r["token_ids"]) and 1 <= len(r["token_ids"]) <= 6
    stats = doc["stats"]
    for key in ("prompt_tokens", "prefill_tokens_per_second", "decode_tokens_per_second", "compile_seconds"):
        assert key in stats
    assert stats["prompt_tokens"] > 0


def test_default_model_answers_the_default_question(tmp_path):
    """`python generate.py`, the README's main command, with the embedded SmolLM2 model."""
    proc = run_script("generate.py", "--json", "--max-tokens", "24", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(proc.stdout)["results"]
    assert result["prompt"] == generate.DEFAULT_PROMPT
    assert "Paris" in result["text"], result["text"]


# -- chat.py over a pipe ------------------------------------------------------------------------
def test_chat_over_a_pipe_keeps_history_resets_and_exits(tiny, chat_reference, tmp_path):
    hello, how = (r["text"] for r in chat_reference["results"])
    # Turn 2 sees turn 1 in its history; after /reset, the same question is answered as in a fresh
    # conversation; /exit ends the chat before the last line.
    stdin = "Hello\nHow are you?\n/reset\nHow are you?\n/exit\nHello\n"
    proc = run_script("chat.py", "--model", tiny, "--max-tokens", "6", cwd=tmp_path, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    assert proc.stdout.startswith(hello + "\n"), (proc.stdout, hello)
    assert proc.stdout.endswith("\n" + how + "\n"), (proc.stdout, how)
    assert len(proc.stdout) >= len(hello) + len(how) + 3  # plus the second turn's answer
    assert os.listdir(tmp_path) == []


def _read_line_with_timeout(stream, seconds: float) -> bytes:
    deadline = time.monotonic() + seconds
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([stream], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise TimeoutError(f"no complete line within {seconds} s; got {data!r}")
        chunk = os.read(stream.fileno(), 1)
        if not chunk:
            break
        data += chunk
    return data


def test_chat_ctrl_c_stops_the_answer_then_quits_at_the_prompt(tiny, tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "chat.py"), "--model", tiny, "--max-tokens", "480"],
                            cwd=str(tmp_path), env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"Hello\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 240)
        assert ready, "no answer started"
        # The marker: the answer's first byte. The tiny model's greedy answer runs all 480 tokens
        # (no EOS), so the answer is still streaming when the signal lands, however slow the host.
        assert os.read(proc.stdout.fileno(), 1)
        proc.send_signal(signal.SIGINT)  # stops the answer, not the program
        assert _read_line_with_timeout(proc.stderr, 120) == b"[answer stopped]\n"
        proc.send_signal(signal.SIGINT)  # at the prompt: quits quietly
        # Wait with stdin still open: closing it first races the Ctrl-C with an end of input,
        # which ends the chat with status 0 if the main thread sees it before the watcher runs.
        proc.wait(timeout=120)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and b"ERROR" not in err, err
    assert os.listdir(tmp_path) == []


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("script, case, needles", [
    ("generate.py", "missing", ["model not found"]),
    ("generate.py", "truncated", ["model.safetensors", "truncated"]),
    ("chat.py", "bad_arch", ["unsupported architecture", "MiniCPMForCausalLM", "LlamaForCausalLM"]),
    ("generate.py", "too_long", ["prompt has", "max_model_len is 16"]),
])
def test_bad_input_subprocess_one_error_line(script, case, needles, tiny, bad_models, tmp_path):
    model = {"missing": str(tmp_path / "nowhere"), "too_long": tiny}.get(case) or bad_models[case]
    args = ["--model", model]
    if case == "too_long":
        args += ["--max-model-len", "16", "word " * 40]
    proc = run_script(script, *args, cwd=tmp_path, stdin="Hello\n")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.strip().splitlines() == [assert_one_error_line(proc.stderr, *needles)]
    assert os.listdir(tmp_path) == []


def _bad_args(case: str, tiny: str, bad_models: dict, tmp_path) -> tuple[list[str], list[str]]:
    """(generate.py arguments, substrings the error line must contain)."""
    cases = {
        "missing_model": (["--model", str(tmp_path / "nowhere"), "x"], ["model not found", "nowhere"]),
        "too_long": (["--model", tiny, "--max-model-len", "16", "word " * 40], ["prompt has", "max_model_len is 16"]),
        "temperature": (["--model", tiny, "--temperature", "-1", "x"], ["temperature must be >= 0"]),
        "top_p": (["--model", tiny, "--top-p", "0", "x"], ["top_p must be in (0, 1]"]),
        "max_tokens": (["--model", tiny, "--max-tokens", "0", "x"], ["max_tokens"]),
        "bfloat16": (["--model", tiny, "--dtype", "bfloat16", "--kernels", "off", "x"], ["bfloat16", "CPU", "kernels"]),
        "dtype": (["--model", tiny, "--dtype", "float64", "x"], ["unknown dtype 'float64'"]),
        "max_model_len": (["--model", tiny, "--max-model-len", "0", "x"], ["--max-model-len"]),
        "empty_prompt": (["--model", tiny, ""], ["prompt 1 is empty"]),
        "prompts_file": (["--model", tiny, "--prompts-file", str(tmp_path / "none.txt")],
                         ["none.txt", "No such file"]),
        "output_dir": (["--model", tiny, "--output", str(tmp_path / "no" / "out.json"), "x"], ["does not exist"]),
        "spec_k": (["--model", tiny, "--speculative-method", "ngram", "--num-speculative-tokens", "0", "x"],
                   ["num_speculative_tokens must be an integer >= 1"]),
        "spec_method": (["--model", tiny, "--speculative-method", "medusa", "--num-speculative-tokens", "2", "x"],
                        ["unknown speculative method 'medusa'"]),
        "spec_no_method": (["--model", tiny, "--num-speculative-tokens", "2", "x"],
                           ["--num-speculative-tokens needs --speculative-method"]),
        "spec_too_long": (["--model", tiny, "--max-model-len", "8", "--speculative-method", "ngram",
                           "--num-speculative-tokens", "8", "x"], ["8 draft tokens", "max_model_len 8"]),
        "draft_missing": (["--model", tiny, "--speculative-model", str(tmp_path / "nodraft"), "--num-speculative-tokens",
                           "2", "x"], ["draft model directory not found", "nodraft"]),
        "draft_arch": (["--model", tiny, "--speculative-model", bad_models["draft_arch"], "--num-speculative-tokens",
                        "2", "x"], ["draft architecture LlamaForCausalLM is not an EAGLE head"]),
        "draft_hidden": (["--model", tiny, "--speculative-model", bad_models["draft_hidden"],
                          "--num-speculative-tokens", "2", "x"], ["draft hidden_size 32", "target's 64"]),
        "draft_vocab": (["--model", tiny, "--speculative-model", bad_models["draft_vocab"],
                         "--num-speculative-tokens", "2", "x"], ["draft vocab_size 100", "target's 260"]),
        "draft_k": (["--model", tiny, "--speculative-model", bad_models["draft_vocab"], "--num-speculative-tokens",
                     "0", "x"], ["num_speculative_tokens must be an integer >= 1"]),
        "eagle_no_model": (["--model", tiny, "--speculative-method", "eagle", "--num-speculative-tokens", "2", "x"],
                           ["speculative method 'eagle' needs 'model'"]),
    }
    return cases[case]


# The loader's own failures are tests/test_loader.py's; here one of them stands for all on the way
# through generate.py's error boundary (and the subprocess cases above take two more).
BAD_CASES = ["missing_model", "too_long", "temperature", "top_p", "max_tokens", "bfloat16", "dtype",
             "max_model_len", "empty_prompt", "prompts_file", "output_dir", "spec_k", "spec_method",
             "spec_no_method", "spec_too_long", "draft_missing", "draft_arch", "draft_hidden", "draft_vocab", "draft_k",
             "eagle_no_model"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gives_one_error_line_and_status_1(case, tiny, bad_models, tmp_path, capsys):
    args, needles = _bad_args(case, tiny, bad_models, tmp_path)
    status = generate.main(args)
    captured = capsys.readouterr()
    assert status == 1, (captured.out, captured.err)
    line = assert_one_error_line(captured.err, *needles)
    assert "\n" not in line
    assert captured.out == ""


def test_chat_bad_input_gives_one_error_line(bad_models, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    assert chat.main(["--model", bad_models["missing_tensor"]]) == 1
    assert_one_error_line(capsys.readouterr().err, "missing tensor")
    assert chat.main(["--top-p", "0"]) == 1  # before any model is loaded
    assert_one_error_line(capsys.readouterr().err, "top_p")


def test_usage_errors_are_one_line_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--max-tokens", "many"])
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, "--max-tokens", "invalid int value")


def test_output_is_not_replaced_by_a_failed_run(tiny, tmp_path, capsys):
    out = tmp_path / "out.json"
    out.write_text("previous results\n")
    status = generate.main(["--model", tiny, "--max-model-len", "16", "--output", str(out), "word " * 40])
    assert status == 1
    assert out.read_text() == "previous results\n"
    assert os.listdir(tmp_path) == ["out.json"]
    assert_one_error_line(capsys.readouterr().err, "max_model_len")


def test_json_is_written_atomically(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("old")
    with pytest.raises(TypeError):
        cli.write_json_atomic(str(out), {"results": [object()]})  # fails half-way through
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]
    cli.write_json_atomic(str(out), {"results": [1, 2]})
    assert json.loads(out.read_text()) == {"results": [1, 2]} and os.listdir(tmp_path) == ["out.json"]


def test_error_boundary():
    def fails(error):
        def main(argv):
            raise error
        return main

    assert cli.run(fails(FileNotFoundError(2, "No such file or directory", "/x/y"))) == 1
    assert cli.run(fails(ValueError("bad\n  value"))) == 1
    assert cli.run(fails(KeyboardInterrupt())) == 130
    assert cli.error_message(FileNotFoundError(2, "No such file or directory", "/x/y")) == \
        "/x/y: No such file or directory"
    assert cli.error_message(ValueError("bad\n  value")) == "bad value"
    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        cli.run(fails(RuntimeError("bug")))


def test_sampling_defaults(tmp_path):
    args = generate.parse_args(["--top-p", "0.5"])
    assert cli.sampling_params(args).temperature == 0.0  # greedy unless asked
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.8, "top_p": 0.8, "eos_token_id": 2}))
    params = cli.sampling_params(args, cli.generation_defaults(str(tmp_path)))
    assert (params.temperature, params.top_p) == (0.8, 0.5)  # the option given wins
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.8}))
    assert cli.generation_defaults(str(tmp_path)) == {}  # no do_sample: greedy, as in transformers


# -- chat.py's turn logic, against a fake LLM ---------------------------------------------------
class FakeLLM:
    """Answers turn n with "answer<n>" in two pieces; records every conversation it is sent."""

    model_path = "/nonexistent"

    def __init__(self, interrupt_turns=(), fail_turns=()):
        self.conversations, self.aborted = [], []
        self.interrupt_turns, self.fail_turns = set(interrupt_turns), set(fail_turns)

    def chat_prompt(self, messages, enable_thinking=None):
        self.conversations.append([dict(m) for m in messages])
        if len(self.conversations) in self.fail_turns:
            raise ValueError("prompt has 600 tokens but max_model_len is 512")
        return [1, 2, 3]

    def stream(self, prompt, params):
        turn = len(self.conversations)
        pieces = ["ans", f"wer{turn}"]
        finished = False
        try:
            text = ""
            for i, piece in enumerate(pieces):
                text += piece
                if turn in self.interrupt_turns:
                    cli.INTERRUPTS.requested = True  # what the SIGINT watcher does on Ctrl-C
                last = i == len(pieces) - 1
                yield RequestOutput(turn, None, [1, 2, 3], [CompletionOutput(0, text, [], "stop" if last else None)],
                                    last, delta=piece)
            finished = True
        finally:
            if not finished:
                self.aborted.append(turn)


def _run_chat(monkeypatch, capsys, fake, stdin, argv=()):
    monkeypatch.setattr(cli, "llm_from_args", lambda args, max_num_seqs, compile_prefill=True: fake)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = chat.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_chat_keeps_history_and_resets(monkeypatch, capsys):
    fake = FakeLLM()
    status, out, err = _run_chat(monkeypatch, capsys, fake, "Hi\n\nAgain\n/reset\nFresh\n/exit\nNever\n",
                                 ["--system", "Be brief."])
    assert status == 0 and err == ""
    assert out == "answer1\nanswer2\nanswer3\n"
    system = {"role": "system", "content": "Be brief."}
    assert fake.conversations == [
        [system, {"role": "user", "content": "Hi"}],
        [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "answer1"},
         {"role": "user", "content": "Again"}],
        [system, {"role": "user", "content": "Fresh"}],
    ]


def test_chat_stopped_answer_returns_to_the_prompt(monkeypatch, capsys):
    fake = FakeLLM(interrupt_turns={1})
    status, out, err = _run_chat(monkeypatch, capsys, fake, "Hi\nNext\n")  # EOF ends the chat
    assert status == 0
    assert err.strip() == "[answer stopped]"
    assert fake.aborted == [1]  # the stream was closed, which aborts the request
    assert out == "ans\nanswer2\n"
    assert fake.conversations[1][1] == {"role": "assistant", "content": "ans"}  # kept as far as it came


def test_chat_failed_turn_is_reported_and_the_chat_goes_on(monkeypatch, capsys):
    fake = FakeLLM(fail_turns={2})
    status, out, err = _run_chat(monkeypatch, capsys, fake, "Hi\nToo long\nAfter\n")
    assert status == 1  # over a pipe, a failed turn makes the exit status 1
    assert_one_error_line(err, "max_model_len is 512", "/reset")
    assert out == "answer1\nanswer3\n"
    assert [m["content"] for m in fake.conversations[2]] == ["Hi", "answer1", "After"]  # the failed turn is dropped
