"""generate.py's defaults: prompts through the chat template unless --raw, one JSON document on
stdout under --tp (msrun found beside the interpreter when not on PATH), and a speed line whose
rates come from the steps themselves, the first call of a shape bucket included."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from tokenizers import Tokenizer

from tests.test_cli import ROOT, _env, _load_script
from tests.tiny import CHATML, make_tiny_model

generate = _load_script("generate")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_generate")))


def independent_ids(tiny: str, text: str) -> list[int]:
    """BOS + the `tokenizers` library's own encoding of `text` (not mindcpm's tokenizer)."""
    return [256] + Tokenizer.from_file(os.path.join(tiny, "tokenizer.json")).encode(text).ids


def run_json(capsys, *argv) -> dict:
    assert generate.main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_prompts_go_through_the_chat_template_unless_raw(tiny, capsys):
    from jinja2 import Template
    rendered = Template(CHATML).render(messages=[{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    chatted = run_json(capsys, "--model", tiny, "--json", "--max-tokens", "2", "Hello")
    assert chatted["chat"] is True
    assert chatted["results"][0]["prompt_tokens"] == len(independent_ids(tiny, rendered))
    raw = run_json(capsys, "--model", tiny, "--json", "--max-tokens", "2", "--raw", "Hello")
    assert raw["chat"] is False and raw["results"][0]["prompt_tokens"] == len(independent_ids(tiny, "Hello"))


def test_system_with_raw_is_one_error_line(tiny, capsys):
    assert generate.main(["--model", tiny, "--raw", "--system", "be brief", "Hello"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --system, --think and --no-think need a chat template")


def test_first_call_rates_are_measured_and_compile_is_apart(tiny):
    """A fresh LLM's first generate compiles every graph it runs: the rates still come from
    measured step times, compile time is counted once and apart, and nothing is counted twice."""
    from mindcpm import LLM, SamplingParams
    llm = LLM(model=tiny, progress=False, max_model_len=64, block_size=8, max_num_seqs=1)
    start = time.perf_counter()
    llm.generate("hello world", SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    elapsed = time.perf_counter() - start
    s = llm.engine.stats
    assert len(llm.engine.runner.compiled_shapes) == 2  # one prefill and one decode graph, both compiled here
    assert s.prefill_tokens == len(independent_ids(tiny, "hello world")) and s.decode_tokens == 2
    assert s.prefill_seconds > 0 and s.decode_seconds > 0 and s.compile_seconds > 0
    assert s.compile_seconds + s.prefill_seconds + s.decode_seconds <= elapsed


def test_tp_json_is_one_document_with_msrun_beside_python(tiny, tmp_path):
    """--tp 2 --json with a PATH that has neither msrun nor this Python: stdout is exactly the
    JSON document (msrun's and MindSpore's lines go to stderr)."""
    interpreter_dir = os.path.dirname(sys.executable)
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not os.path.exists(os.path.join(d, "msrun")) and d != interpreter_dir)
    assert os.path.exists(os.path.join(interpreter_dir, "msrun")), "msrun is installed beside the interpreter"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", tiny, "--tp", "2", "--json",
                           "--max-tokens", "3", "--max-model-len", "64", "hello"],
                          cwd=str(tmp_path), env=dict(_env(), PATH=path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    document = json.loads(proc.stdout)  # the whole of stdout, nothing before or after
    assert document["results"][0]["prompt"] == "hello" and len(document["results"][0]["token_ids"]) == 3
    assert "Start worker process" in proc.stderr


def test_without_msrun_anywhere_tp_is_one_error_line(monkeypatch, tmp_path):
    from mindcpm import cli
    from mindcpm.parallel import ParallelError
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(ParallelError, match="found neither on PATH nor beside"):
        cli.find_msrun(["msrun", "--worker_num=2", "generate.py"], 2)


@pytest.mark.parametrize("argv,needle", [(["--model", "/nonexistent/model"], "error: model not found"),
                                         (["--port", "70000"], "error: --port must be in 0..65535")])
def test_serve_bad_options_are_one_error_line(argv, needle, capsys):
    from mindcpm import serve
    try:
        status = serve.main(argv)
    except SystemExit as e:  # argparse's usage errors
        status = e.code
    assert status in (1, 2)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(needle)
