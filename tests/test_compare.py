"""benchmarks/compare.py's quantized peers: mindcpm int8 / int4 against llama.cpp q8_0 / q4_0 on
the same random weights (GGUF files of those block types), each ratio taken against the mindcpm
row of the same bytes per weight, and a llama.cpp peer whose batched prefill crashes run again
token by token with a note instead of failing the comparison."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from mindcpm import bench
from tests.paths import ROOT

spec = importlib.util.spec_from_file_location("mindcpm_script_compare_quant", os.path.join(ROOT, "benchmarks/compare.py"))
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def _row(decode):
    return {"status": "ok", "runs": [{"decode_tokens_per_second": d, "ttft_ms": 100.0} for d in decode]}


def test_quantized_peers_are_compared_with_mindcpm_of_the_same_bytes():
    rows = {"mindcpm": _row([10.0, 10.0]), "mindcpm-int8": _row([30.0, 60.0]), "mindcpm-int4": _row([40.0, 40.0]),
            "llama.cpp-q8_0": _row([30.0, 30.0]), "llama.cpp-q4_0": _row([20.0, 80.0]),
            "llama.cpp-f32": _row([10.0, 10.0])}
    compare.add_ratios(rows)
    assert rows["llama.cpp-q8_0"]["mindcpm_decode_x"] == {"median": 1.5, "min": 1.0, "max": 2.0}
    assert rows["llama.cpp-q4_0"]["mindcpm_decode_x"] == {"median": 1.25, "min": 0.5, "max": 2.0}
    assert rows["llama.cpp-f32"]["mindcpm_decode_x"]["median"] == 1.0
    assert "mindcpm_decode_x" not in rows["mindcpm-int8"] and "mindcpm_decode_x" not in rows["mindcpm-int4"]
    # Without its counterpart a quantized peer is compared with fp32 mindcpm.
    rows = {"mindcpm": _row([10.0]), "llama.cpp-q8_0": _row([20.0])}
    compare.add_ratios(rows)
    assert rows["llama.cpp-q8_0"]["mindcpm_decode_x"]["median"] == 0.5


def test_quantized_peers_parse_and_need_llama_cpp(monkeypatch):
    args = compare.parse_args(["--peers", "mindcpm-int8,mindcpm-int4,llama.cpp-q8_0,llama.cpp-q4_0"])
    assert args.peers == ["mindcpm-int8", "mindcpm-int4", "llama.cpp-q8_0", "llama.cpp-q4_0"]
    real = importlib.util.find_spec
    monkeypatch.setattr(compare.importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    missing = compare.missing_peers(args.peers)
    assert set(missing) == {"llama.cpp-q8_0", "llama.cpp-q4_0"}
    assert missing["llama.cpp-q4_0"] == "not installed (pip install llama-cpp-python)"


@pytest.mark.parametrize("label,block,bytes_per_block", [("q8_0", 32, 34), ("q4_0", 32, 18)])
def test_gguf_matrices_are_the_random_weights_in_the_block_type(tmp_path, label, block, bytes_per_block):
    """Read back with gguf-py's reader and decoded with numpy from the block layouts (Q8_0: fp16
    d, 32 int8 q, w = d q; Q4_0: fp16 d, 16 bytes of nibbles j | j+16, w = d (q - 8)): each matrix
    is its weight to within half a quantization step (and d's fp16 rounding), under its GGUF name
    and type."""
    gguf = pytest.importorskip("gguf")
    cfg = bench.SHAPES["tiny-llama"]
    weights = compare.random_weights(cfg, seed=0)
    checkpoint = str(tmp_path / "checkpoint")
    compare.write_checkpoint(checkpoint, "tiny-llama", weights)
    path = str(tmp_path / f"{label}.gguf")
    compare.write_gguf(path, cfg, weights, checkpoint, label)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for hf_name, value in weights.items():
        t = tensors[compare.gguf_name(hf_name)]
        if value.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert t.tensor_type.name == label.upper(), hf_name
        kind = compare.gguf_name(hf_name).split(".")[-2]
        if kind in ("attn_q", "attn_k"):
            value = compare.interleave_rope_rows(value, cfg["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"])
        raw = np.asarray(t.data, np.uint8).reshape(-1, bytes_per_block)
        d = raw[:, :2].copy().view(np.float16).astype(np.float32)
        if label == "q8_0":
            q = raw[:, 2:].view(np.int8).astype(np.float32)
        else:
            nib = raw[:, 2:]
            q = np.concatenate([nib & 15, nib >> 4], axis=1).astype(np.float32) - 8
        decoded = (d * q).reshape(value.shape)
        step = np.abs(d).repeat(block, axis=1).reshape(value.shape)
        # Codes are rounded against the unrounded d, then d is stored in fp16 (half an ulp, 2^-11
        # relative, off for each of up to `largest` steps).
        largest = 127 if label == "q8_0" else 8
        bound = step * (0.5 + (largest + 1) * 2.0**-11)
        if label == "q4_0":  # d = the extreme / -8: the other extreme can be a step past code +7
            bound = np.where(q.reshape(value.shape) == 7, 2 * bound, bound)
        assert np.all(np.abs(decoded - value) <= bound), hf_name


class FakeWorker:
    """A worker whose llama.cpp load crashes unless its spec asks for n_batch 1."""
    started: list = []

    def __init__(self, peer, spec, tmp, threads):
        FakeWorker.started.append((peer, spec.get("n_batch")))
        self.crashes = spec["engine"] == "llama.cpp" and spec.get("n_batch") != 1
        self.failure = "status -11" if self.crashes else None

    def ready(self):
        return not self.crashes


def test_a_crashed_quantized_llamacpp_peer_runs_again_with_n_batch_1(monkeypatch):
    monkeypatch.setattr(compare, "Worker", FakeWorker)
    FakeWorker.started = []
    spec = {"engine": "llama.cpp"}
    worker, failure, note = compare.start("llama.cpp-q8_0", spec, "/tmp", 2)
    assert worker is not None and failure is None
    assert note == "n_batch 1: batched prefill crashed (status -11)"
    assert FakeWorker.started == [("llama.cpp-q8_0", None), ("llama.cpp-q8_0", 1)]
    # Float GGUFs have no such crash to work around: a failure stays a failure.
    FakeWorker.started = []
    worker, failure, note = compare.start("llama.cpp-f32", spec, "/tmp", 2)
    assert worker is None and failure == "status -11" and note is None
    assert FakeWorker.started == [("llama.cpp-f32", None)]


def test_the_note_is_in_the_table():
    rows = [{"engine": "llama.cpp-q4_0", "weights": "q4_0", "status": "ok", "note": "n_batch 1: batched prefill crashed (x)",
             "metrics": {"decode_tokens_per_second": 10.0}}]
    assert "n_batch 1: batched prefill crashed (x)" in compare.table(rows)


def tiny_gguf(tmp_path, label: str) -> str:
    """The tiny-llama shape's random weights as a GGUF of `label` blocks, where llama.cpp runs."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    cfg = bench.SHAPES["tiny-llama"]
    weights = compare.random_weights(cfg, seed=0)
    checkpoint = str(tmp_path / "checkpoint")
    compare.write_checkpoint(checkpoint, "tiny-llama", weights)
    path = str(tmp_path / f"{label}.gguf")
    compare.write_gguf(path, cfg, weights, checkpoint, label)
    return path


def test_llama_cpp_runs_the_q4_0_file(tmp_path):
    """The written file is one llama.cpp loads and generates from (where it is installed)."""
    path = tiny_gguf(tmp_path, "q4_0")
    run = compare.load_llamacpp({"path": path, "prompt_len": 8, "output_len": 4, "n_batch": 1})
    ttft, gaps = run([list(range(10, 18))])
    assert ttft > 0 and len(gaps) == 3


def test_llama_cpp_batched_sequences_generate_what_each_does_alone(tmp_path):
    """--batch: llama.cpp's sequences API, every step one token of each sequence, gives each
    prompt the greedy tokens llama.cpp's own one-request generate gives it (q8_0: each row's dot
    products do not depend on the batch), and its step gaps."""
    path = tiny_gguf(tmp_path, "q8_0")
    prompts = [list(range(10, 18)), list(range(40, 49)), list(range(7, 12))]
    spec = {"path": path, "prompt_len": 9, "output_len": 5}
    batched = compare.load_llamacpp(dict(spec, batch=3, n_batch=4))  # prompts longer than n_batch: chunked
    ttft, gaps = batched(prompts)
    assert ttft > 0 and len(gaps) == 4
    alone = compare.load_llamacpp(spec)
    for prompt, tokens in zip(prompts, batched.outputs):
        alone([prompt])
        assert tokens == alone.outputs[0]


def test_batched_rates_count_every_request():
    """B requests in lock step: tokens/s and prefill/decode rates are B times one request's."""
    one = compare.timings(0.5, [0.1, 0.1, 0.2], prompt_len=100)
    four = compare.timings(0.5, [0.1, 0.1, 0.2], prompt_len=100, batch=4)
    assert one["decode_tokens_per_second"] == pytest.approx(3 / 0.4)
    assert one["tokens_per_second"] == pytest.approx(4 / 0.9) and one["prefill_tokens_per_second"] == 200
    for key in ("decode_tokens_per_second", "tokens_per_second", "prefill_tokens_per_second"):
        assert four[key] == pytest.approx(4 * one[key])
    assert four["ttft_ms"] == one["ttft_ms"] == 500
