"""mindcpm.serve over real HTTP on 127.0.0.1, driven by the official `openai` client, against
offline LLM.generate on the same tiny model (greedy, so both must give the same tokens)."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.tiny import make_tiny_model

openai = pytest.importorskip("openai")

MAX_NUM_SEQS, MAX_WAITING, MAX_MODEL_LEN = 8, 8, 512
START_TIMEOUT = 300


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_serve")))


@pytest.fixture(scope="module")
def server(tiny_dir):
    """The server in a subprocess on a port the kernel picks."""
    from mindcpm.serve import spawn, stop
    proc, url = spawn(["--model", tiny_dir, "--block-size", "8", "--max-model-len", str(MAX_MODEL_LEN),
                       "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting", str(MAX_WAITING)], START_TIMEOUT)
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(tiny_dir):
    from mindcpm import LLM
    return LLM(model=tiny_dir, progress=False, block_size=8, max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS)


def greedy(**kw):
    from mindcpm import SamplingParams
    return SamplingParams(temperature=0.0, ignore_eos=True, **kw)


def metrics(server) -> dict[str, float]:
    text = urllib.request.urlopen(server + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_all_blocks_free(server, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m["mindcpm:kv_cache_blocks_used"] == 0 and m["mindcpm:num_requests_running"] == 0:
            return m
        assert time.monotonic() < deadline, f"blocks still in use: {m}"
        time.sleep(0.1)


def test_models_health_metrics(server, client, tiny_dir):
    assert [m.id for m in client.models.list().data] == [tiny_dir]
    assert urllib.request.urlopen(server + "/health", timeout=30).status == 200
    m = metrics(server)
    assert m["mindcpm:kv_cache_blocks_total"] > 0 and "mindcpm:time_to_first_token_seconds_count" in m


def test_completion_with_logprobs_matches_offline(client, offline, tiny_dir):
    ref = offline.generate("hello world", greedy(max_tokens=12, logprobs=2))[0].outputs[0]
    r = client.completions.create(model=tiny_dir, prompt="hello world", max_tokens=12, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert (c.text, c.finish_reason) == (ref.text, "length")
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(offline.tokenizer.encode("hello world"))
    assert len(c.logprobs.tokens) == 12 and len(c.logprobs.top_logprobs) == 12
    want = [e[t] for e, t in zip(ref.logprobs, ref.token_ids)]
    assert c.logprobs.token_logprobs == pytest.approx(want, abs=1e-5)


def test_chat_stream_equals_chat_and_offline(client, offline, tiny_dir):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a river"}]
    ref = offline.chat(messages, greedy(max_tokens=10))[0].outputs[0].text
    kw = dict(model=tiny_dir, messages=messages, max_completion_tokens=10, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.content == ref and whole.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ref
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices


def test_chat_logprobs_and_thinking_kwarg(client, offline, tiny_dir):
    r = client.chat.completions.create(model=tiny_dir, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}})
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)


def test_stop_string(client, offline, tiny_dir):
    full = offline.generate("hello world", greedy(max_tokens=20))[0].outputs[0].text
    k = next(k for k in range(3, 18) if full.find(full[k:k + 2]) == k and full[k:k + 2].isascii())
    r = client.completions.create(model=tiny_dir, prompt="hello world", max_tokens=20, temperature=0,
                                  stop=[full[k:k + 2]], extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full[:k], "stop")


def test_16_concurrent_clients_get_offline_tokens(server, client, offline, tiny_dir):
    prompts = [f"prompt {i}: " + "abcdefgh"[: i % 8] * (1 + i % 3) for i in range(16)]
    ref = [o.outputs[0].text for o in offline.generate(prompts, greedy(max_tokens=24))]

    def ask(i):
        if i % 2:
            stream = client.completions.create(model=tiny_dir, prompt=prompts[i], max_tokens=24, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            return "".join(ch.choices[0].text for ch in stream if ch.choices)
        return client.completions.create(model=tiny_dir, prompt=prompts[i], max_tokens=24, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    assert got == ref
    wait_all_blocks_free(server)


def test_closed_stream_frees_every_block(server, client, tiny_dir):
    aborted = metrics(server).get('mindcpm:request_success_total{finished_reason="abort"}', 0)
    stream = client.completions.create(model=tiny_dir, prompt="a long answer", max_tokens=400, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    m = wait_all_blocks_free(server)
    assert m['mindcpm:request_success_total{finished_reason="abort"}'] == aborted + 1


def test_client_leaving_a_plain_request_frees_its_blocks(server, tiny_dir):
    """A non-streaming client that gives up (its timeout) has its request aborted too."""
    aborted = metrics(server).get('mindcpm:request_success_total{finished_reason="abort"}', 0)
    impatient = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=tiny_dir, prompt="a long answer", max_tokens=480, temperature=0,
                                     extra_body={"ignore_eos": True})
    m = wait_all_blocks_free(server)
    assert m['mindcpm:request_success_total{finished_reason="abort"}'] == aborted + 1


def _post_raw(server, path: str, data: bytes):
    req = urllib.request.Request(server + path, data=data, headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=30)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    raise AssertionError("expected an error status")


@pytest.mark.parametrize("case,match", [
    (dict(model="nope", prompt="x"), "not served here"),
    (dict(prompt="x", max_tokens=-3), "max_tokens must be an integer >= 1"),
    (dict(prompt="x" * (MAX_MODEL_LEN + 10)), "max_model_len"),
    (dict(prompt="x", n=2), "n must be 1"),
    (dict(prompt="x", temperature=-1), "temperature must be >= 0"),
], ids=["unknown-model", "negative-max-tokens", "prompt-over-context", "n", "temperature"])
def test_bad_completion_requests_get_400(client, tiny_dir, case, match):
    case = {"model": tiny_dir, **case}
    with pytest.raises(openai.BadRequestError, match=match) as e:
        client.completions.create(**case)
    assert e.value.status_code == 400


def test_bad_chat_and_malformed_json_get_400(server, client, tiny_dir):
    with pytest.raises(openai.BadRequestError, match="has no 'role'"):
        client.chat.completions.create(model=tiny_dir, messages=[{"content": "hi"}])
    status, doc = _post_raw(server, "/v1/chat/completions", b'{"model": "x", "messages": [')
    assert status == 400 and "not valid JSON" in doc["error"]["message"] and doc["error"]["code"] == 400


def test_full_queue_gets_503(server, client, tiny_dir):
    """MAX_NUM_SEQS running + MAX_WAITING waiting fill the server; one more is refused. Each
    answer is long (hundreds of decode steps), so none ends while the next ones are opened."""
    streams = []
    try:
        for i in range(MAX_NUM_SEQS + MAX_WAITING):
            streams.append(client.completions.create(model=tiny_dir, prompt=f"fill {i}", max_tokens=480,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True}))
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=tiny_dir, prompt="one too many", max_tokens=2)
        assert e.value.status_code == 503 and "capacity" in str(e.value)
    finally:
        for s in streams:
            s.close()
    wait_all_blocks_free(server)


def test_tensor_parallel_server(tiny_dir, offline):
    """--tp 2: rank 0 serves HTTP, both ranks run every step; SIGTERM ends every process."""
    from mindcpm.serve import spawn, stop
    ref = offline.generate("hello world", greedy(max_tokens=8))[0].outputs[0].text
    proc, url = spawn(["--model", tiny_dir, "--tp", "2", "--block-size", "8", "--max-model-len", "128",
                       "--max-num-seqs", "2"], START_TIMEOUT)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = client.completions.create(model=tiny_dir, prompt="hello world", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == ref
        ranks = serving_processes(tiny_dir)
        assert len(ranks) >= 3  # the launcher and two ranks (msrun adds a scheduler process)
    finally:
        stop(proc)
    deadline = time.monotonic() + 60
    while serving_processes(tiny_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = serving_processes(tiny_dir)
    assert not left, "outlived the server: " + "; ".join(describe(pid) for pid in left)


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} state {fields.get('State')} parent {fields.get('PPid')}: {argv[:200]}"


def serving_processes(model_dir: str) -> list[int]:
    """Pids of live processes running `mindcpm.serve --model model_dir --tp ...` (the module's
    single-process server runs meanwhile, without --tp)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if b"mindcpm.serve" in argv and model_dir.encode() in argv and b"--tp" in argv and \
                b"msrun" not in argv[1] and not zombie:
            found.append(int(pid))
    return found
