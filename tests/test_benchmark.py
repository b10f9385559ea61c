"""benchmark.py and benchmarks/compare.py: the matrix from the command line, the memory check,
the tables, and one tiny end-to-end run whose --json output must parse."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mindcpm import bench
from mindcpm.gguf import unpermute_qk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = _load("benchmark.py", "mindcpm_script_benchmark")
compare = _load("benchmarks/compare.py", "mindcpm_script_compare")


# -- the command line ---------------------------------------------------------------------------
def test_matrix_is_every_combination_in_model_order():
    args = benchmark.parse_args(["--models", "tiny-llama,smollm2-135m", "-b", "1,4", "-p", "16", "-n", "8,32",
                                 "--paged", "on,off", "--precision", "fp32,f16", "-r", "2",
                                 "--workload", "fixed,mixed"])
    cells = benchmark.cells_from_args(args)
    assert len(cells) == 2 * 2 * 2 * 2 * 2 * 2
    assert [c.model for c in cells[:32]] == ["tiny-llama"] * 32
    assert {c.workload for c in cells} == {"fixed", "mixed"}
    assert {c.precision for c in cells} == {"float32", "float16"}
    assert all(c.repetitions == 2 and c.prompt_len == 16 for c in cells)


def test_defaults_are_the_quick_matrix():
    cells = benchmark.cells_from_args(benchmark.parse_args([]))
    assert [c.model for c in cells] == ["smollm2-135m", "minicpm4-0.5b", "minicpm4-8b"]
    assert all(c.precision == "float32" and c.batch == 1 and c.paged for c in cells)


def test_paged_off_is_one_block_per_sequence():
    on = bench.Cell("tiny-llama", prompt_len=100, output_len=30)
    off = bench.Cell("tiny-llama", prompt_len=100, output_len=30, paged=False)
    assert on.effective_block_size == 16 and on.paged_label == "on (block 16)"
    assert off.effective_block_size == 144 and off.paged_label == "off (block 144)"  # 130 rounded up to 16
    assert off.llm_kwargs()["block_size"] == 144 and off.llm_kwargs()["max_model_len"] == 130


def test_mixed_workload_has_four_requests_per_slot_of_bounded_lengths():
    rng = np.random.default_rng(0)
    cell = bench.Cell("tiny-llama", batch=3, prompt_len=40, output_len=20, workload="mixed")
    requests = bench.workload(cell, rng, 512)
    assert len(requests) == 12
    assert all(10 <= len(ids) <= 40 and 5 <= n <= 20 for ids, n in requests)
    assert len({len(ids) for ids, _ in requests}) > 1
    fixed = bench.workload(bench.Cell("tiny-llama", batch=3, prompt_len=40, output_len=20), rng, 512)
    assert [(len(ids), n) for ids, n in fixed] == [(40, 20)] * 3


@pytest.mark.parametrize("workload, new_graphs_per_run, runs", [
    ("fixed", [3, 0, 0], 1),  # every run has the same shapes: one warm-up run
    ("mixed", [5, 2, 1, 0, 0], 4),  # until a run (after the first) compiles nothing new
    ("mixed", [1] * 10, bench.MIXED_WARMUP_RUNS),  # and never more than the cap
])
def test_warm_up_repeats_a_mixed_workload_until_no_new_graph(monkeypatch, workload, new_graphs_per_run, runs):
    from types import SimpleNamespace
    compiled = set()
    calls = []

    def fake_run(llm, requests):  # a run that compiles new_graphs_per_run[i] shapes
        calls.append(requests)
        compiled.update((len(calls), j) for j in range(new_graphs_per_run[len(calls) - 1]))

    monkeypatch.setattr(bench, "timed_run", fake_run)
    llm = SimpleNamespace(engine=SimpleNamespace(runner=SimpleNamespace(compiled_shapes=compiled)))
    cell = bench.Cell("tiny-llama", batch=2, workload=workload)
    bench.warm_up(llm, cell, np.random.default_rng(0), 512)
    assert len(calls) == runs


def test_kernels_option_passes_straight_to_llm():
    assert "kernels" not in bench.Cell("tiny-llama").llm_kwargs()
    assert bench.Cell("tiny-llama", kernels="on").llm_kwargs()["kernels"] == "on"
    cells = benchmark.cells_from_args(benchmark.parse_args(["-m", "tiny-llama", "--kernels", "on,off"]))
    assert [c.kernels for c in cells] == ["on", "off"]
    assert [c.kernels for c in benchmark.cells_from_args(benchmark.parse_args(["-m", "tiny-llama"]))] == [None]


def test_speculative_cells_and_the_repeat_workload():
    cells = benchmark.cells_from_args(benchmark.parse_args(["-m", "tiny-llama", "--speculative-method", "off,ngram",
                                                            "--num-speculative-tokens", "3", "--workload", "repeat"]))
    assert [(c.speculative, c.num_speculative_tokens) for c in cells] == [("off", 3), ("ngram", 3)]
    assert "speculative_config" not in cells[0].llm_kwargs()
    assert cells[1].llm_kwargs()["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3}
    requests = bench.workload(cells[1], np.random.default_rng(0), 512)
    assert all(len(ids) == 128 and ids[:64] == ids[64:] and n == 32 for ids, n in requests)
    with pytest.raises(ValueError, match="--num-speculative-tokens must be >= 1"):
        benchmark.cells_from_args(benchmark.parse_args(["--speculative-method", "ngram", "--num-speculative-tokens",
                                                        "0"]))


def test_oracle_cells_one_per_rate_verify_rows_of_k_plus_one():
    cells = benchmark.cells_from_args(benchmark.parse_args(["-m", "tiny-llama", "--speculative-method", "off,oracle",
                                                            "--oracle-acceptance", "1.0,0.6"]))
    assert [(c.speculative, c.oracle_acceptance) for c in cells] == [("off", 1.0), ("oracle", 1.0), ("oracle", 0.6)]
    # The oracle replaces the engine's proposer; the config gives the runner its verify rows.
    assert cells[2].llm_kwargs()["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 4}
    # A measured run repeats the prompts of the plain run before it: the prefix cache would skip its prefill.
    assert cells[2].llm_kwargs()["enable_prefix_caching"] is False and "enable_prefix_caching" not in \
        cells[0].llm_kwargs()


def test_oracle_proposes_the_continuation_made_wrong_at_the_rate():
    prompts, outputs = [[5, 6, 7], [8, 9, 10, 11]], [[1, 2, 3, 4, 5, 6], [7, 8]]
    right = bench.OracleProposer(prompts, outputs, 4, 1.0, 50, 0)
    assert right.propose([5, 6, 7, 1], 10) == [2, 3, 4, 5]
    assert right.propose([8, 9, 10, 11], 10) == [7, 8] and right.propose([5, 6, 7], 2) == [1, 2]
    wrong = bench.OracleProposer(prompts, outputs, 4, 0.0, 50, 0).propose([5, 6, 7, 1], 10)
    assert len(wrong) == 4 and all(0 <= t < 50 and t != r for t, r in zip(wrong, [2, 3, 4, 5]))
    # Each draft token independently right with probability `rate`.
    long = bench.OracleProposer([[0]], [list(range(1, 40001))], 40000, 0.6, 100000, 1).propose([0], 40000)
    assert abs(np.mean(np.asarray(long) == np.arange(1, 40001)) - 0.6) < 0.01


@pytest.fixture(scope="module")
def tiny_oracle_llm(tmp_path_factory):
    """The tiny-llama shape (random weights) with verify rows of 1 + 4 tokens."""
    from mindcpm import LLM
    cell = bench.Cell("tiny-llama", batch=3, prompt_len=10, output_len=12, speculative="oracle")
    path = bench.write_shape_dir("tiny-llama", str(tmp_path_factory.mktemp("tiny-llama")))
    return cell, LLM(model=path, load_format="dummy", **cell.llm_kwargs())


@pytest.mark.parametrize("method, rate, accepted", [("oracle", 1.0, 1.0), ("oracle", 0.0, 0.0), ("ngram", 1.0, None)])
def test_oracle_run_is_lossless_and_accepted_at_its_rate(tiny_oracle_llm, method, rate, accepted):
    """Greedy output with the oracle's drafts equals the engine's output without drafts; at rate 1
    every draft is accepted (the chain yields k + 1 tokens a step), at rate 0 none is. Every
    speculative run comes with its paired plain run, of the same output."""
    from dataclasses import replace

    from mindcpm.engine.spec_decode import SpecStats
    cell, llm = tiny_oracle_llm
    cell = replace(cell, speculative=method, oracle_acceptance=rate)
    requests = bench.workload(cell, np.random.default_rng(3), 512)
    llm.engine.proposer = None
    plain = bench.timed_run(llm, requests)
    llm.engine.spec_stats = SpecStats()
    run, paired = bench.run_once(llm, cell, requests)
    stats = llm.engine.spec_stats
    assert run.outputs == plain.outputs == paired.outputs and [len(o) for o in run.outputs] == [12] * 3
    if accepted is not None:
        assert stats.num_draft_tokens > 0 and stats.acceptance_rate == accepted
    if accepted == 1.0:  # after the prefill's token: two chains of 4 drafts + 1, then a plain decode step
        assert stats.num_drafts == 3 * 2 and stats.num_accepted_tokens == 3 * 8


def test_speedup_is_against_the_plain_row_of_the_same_workload():
    def row(speculative, decode, workload="fixed", **metrics):
        r = _row("minicpm4-0.5b")
        r.update(speculative=speculative, num_speculative_tokens=4, oracle_acceptance=0.6, workload=workload)
        r["metrics"].update(decode_tokens_per_second=decode, **metrics)
        return r

    spec = dict(spec_acceptance_rate=0.33, spec_mean_accepted_length=2.3)
    rows = [row("off", 20.0, "repeat"), row("off", 10.0), row("oracle", 15.0, plain_decode_tokens_per_second=12.0,
                                                               **spec), row("ngram", 30.0, "repeat", **spec)]
    text = bench.report_text(rows, ENV).splitlines()
    assert text[4].rstrip(" |").endswith("oracle 60% k=4: 33% accepted, mean length 2.30, decode 1.25x paired plain, "
                                         "decode 1.50x row 2")
    assert text[5].rstrip(" |").endswith("ngram k=4: 33% accepted, mean length 2.30, decode 1.50x row 1")


@pytest.mark.parametrize("argv, needle", [
    (["-b", "0"], "--batch"), (["-p", "x"], "--prompt-len"), (["--paged", "maybe"], "--paged"),
    (["--precision", "int3"], "--precision"), (["-n", ""], "--output-len"), (["--workload", "bursty"], "--workload"),
    (["--kernels", "maybe"], "--kernels"), (["--speculative-method", "medusa"], "--speculative-method"),
    (["--oracle-acceptance", "1.5"], "--oracle-acceptance")])
def test_bad_option_is_one_usage_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err


def test_unknown_model_is_a_one_line_error(capsys):
    assert benchmark.cli.run(benchmark.main, ["--models", "no-such-shape", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'no-such-shape'") and "minicpm4-0.5b" in err


# -- shapes and memory --------------------------------------------------------------------------
def test_parameter_counts_match_the_published_models():
    # SmolLM2-135M: 134,515,008 parameters (its model card); MiniCPM4-8B: embedding and head
    # 300.8 M each plus 32 layers of 236.98 M (spec minicpm4.md §1b).
    assert bench.parameter_count(bench.shape_config("smollm2-135m")) == 134_515_008
    assert bench.parameter_count(bench.shape_config("minicpm4-8b")) == pytest.approx(
        2 * 300.8e6 + 32 * 236.98e6, rel=1e-3)


@pytest.mark.parametrize("shape", ["tiny-llama", "smollm2-135m", "minicpm4-0.5b"])
def test_parameter_count_equals_the_tensors_compare_writes(shape):
    cfg = bench.SHAPES[shape]
    assert bench.parameter_count(bench.shape_config(shape)) == sum(
        int(np.prod(s)) for s in compare.hf_shapes(cfg).values())


def test_too_big_shape_is_refused_with_a_reason():
    eight_b, half_b = bench.shape_config("minicpm4-8b"), bench.shape_config("minicpm4-0.5b")
    reason = bench.refusal(eight_b, bench.Cell("minicpm4-8b"), False, total=24 * GIB, available=20 * GIB)
    assert reason.startswith("too big: needs ~") and "float32" in reason and "this machine has 24.0 GiB" in reason
    assert bench.refusal(half_b, bench.Cell("minicpm4-0.5b"), False, total=24 * GIB, available=20 * GIB) is None
    busy = bench.refusal(half_b, bench.Cell("minicpm4-0.5b"), False, total=24 * GIB, available=1 * GIB)
    assert busy.startswith("not enough free memory now: needs ~") and "1.0 of 24.0 GiB free" in busy
    # The 8B fp32 weights alone are ~30.5 GiB.
    assert bench.estimate_memory(eight_b, bench.Cell("minicpm4-8b"), False) > 30.5 * GIB


def test_refused_cell_does_not_start_a_process():
    needed = bench.estimate_memory(bench.shape_config("minicpm4-8b"), bench.Cell("minicpm4-8b"), False)
    if bench.total_memory() >= needed:
        pytest.skip("this machine has the memory for 8B in fp32")
    row = bench.measure(bench.Cell("minicpm4-8b", precision="float32"))
    assert row["status"] == "refused" and row["metrics"] == {} and "too big" in row["reason"]


def test_filler_tokenizer_covers_the_vocabulary(tmp_path):
    from mindcpm.tokenizer import Tokenizer
    bench.write_filler_tokenizer(str(tmp_path), 5000)
    tok = Tokenizer.from_dir(str(tmp_path))
    assert tok.vocab_size == 5000
    text = tok.decode([300, 4000, 4999], True)
    assert len(text) >= 6 and text.isascii() and text.isalpha()


def test_gguf_q_k_rows_are_what_mindcpm_unpermutes():
    q = np.random.default_rng(0).standard_normal((9 * 64, 576)).astype(np.float32)
    assert np.array_equal(unpermute_qk(compare.interleave_rope_rows(q, 9), 9), q)
    assert compare.gguf_name("model.layers.3.self_attn.k_proj.weight") == "blk.3.attn_k.weight"
    assert compare.gguf_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert compare.gguf_name("lm_head.weight") == "output.weight"


def test_dummy_weights_are_seeded_random_matrices_and_unit_norms():
    from mindcpm.engine.runner import ModelRunner, RunnerConfig
    from mindcpm.loader import load_dummy_weights, loadable_parameters

    def weights(seed):
        runner = ModelRunner(bench.shape_config("tiny-llama"), RunnerConfig(16, 4, 1, 64), None)
        load_dummy_weights(runner.model, seed=seed)
        return {name: p.asnumpy() for name, p in loadable_parameters(runner.model).items()}

    first, again, other = weights(0), weights(0), weights(1)
    for name, value in first.items():
        assert np.array_equal(value, again[name])
        if value.ndim == 1:
            assert np.all(value == 1), name
        else:
            assert 0.015 < value.std() < 0.025 and not np.array_equal(value, other[name]), name


def test_unknown_load_format_is_a_value_error():
    from mindcpm import LLM
    with pytest.raises(ValueError, match="unknown load_format 'fake'"):
        LLM(load_format="fake")


def test_compare_names_a_missing_peer_and_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(compare.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llama_cpp", "torch") else real(name, *a))
    missing = compare.missing_peers(list(compare.PEERS))
    assert "mindcpm" not in missing
    assert missing["llama.cpp-f16"] == "not installed (pip install llama-cpp-python)"
    assert "pip install torch transformers" in missing["transformers"]


def test_compare_takes_each_ratio_within_a_round():
    def row(decode, ttft):
        return {"status": "ok", "runs": [{"decode_tokens_per_second": d, "ttft_ms": t} for d, t in zip(decode, ttft)]}

    rows = {"mindcpm": row([10.0, 20.0, 30.0], [100.0, 100.0, 50.0]),
            "mindcpm-bf16": row([40.0, 40.0, 40.0], [80.0, 80.0, 80.0]),
            "llama.cpp-f32": row([5.0, 40.0, 30.0], [200.0, 50.0, 50.0]),
            "llama.cpp-f16": row([20.0, 80.0, 40.0], [40.0, 40.0, 160.0]),
            "transformers": {"status": "failed", "reason": "x"}}
    compare.add_ratios(rows)
    # f32: rounds 10/5, 20/40, 30/30; the 16-bit peer against mindcpm-bf16: 40/20, 40/80, 40/40.
    assert rows["llama.cpp-f32"]["mindcpm_decode_x"] == {"median": 1.0, "min": 0.5, "max": 2.0}
    assert rows["llama.cpp-f16"]["mindcpm_decode_x"] == {"median": 1.0, "min": 0.5, "max": 2.0}
    # TTFT: theirs / ours.
    assert rows["llama.cpp-f32"]["mindcpm_ttft_x"]["median"] == 1.0
    assert rows["llama.cpp-f16"]["mindcpm_ttft_x"] == {"median": 0.5, "min": 0.5, "max": 2.0}
    assert "mindcpm_decode_x" not in rows["mindcpm"] and "mindcpm_decode_x" not in rows["transformers"]


# -- tables ---------------------------------------------------------------------------------------
ENV = {"mindspore": "2.10.0", "device": "CPU", "cards": 1, "cpu_count": 2}


def _row(model, status="ok", reason=None, tps=12.5):
    metrics = {} if status != "ok" else {
        "tokens_per_second": tps, "prefill_tokens_per_second": 300.0, "ttft_ms": 40.0,
        "decode_tokens_per_second": 14.0, "itl_p50_ms": 70.0, "itl_p99_ms": 90.0, "peak_memory_gib": 1.5,
        "load_seconds": 2.0, "compile_seconds": 20.0, "recompiles_after_warmup": 0}
    return {"model": model, "precision": "float32", "batch": 1, "prompt_len": 128, "output_len": 32,
            "paged_attention": "on (block 16)", "repetitions": 3, "status": status, "reason": reason,
            "metrics": metrics}


def test_table_has_the_seed_columns_and_a_reason_for_a_refused_row():
    text = bench.report_text([_row("smollm2-135m"), _row("minicpm4-8b", "refused", "too big: needs ~34 GiB")], ENV)
    seed_header, rule, first, second = text.splitlines()[:4]
    columns = [c.strip() for c in seed_header.strip("|").split("|")]
    assert columns[1:6] == ["model", "MindSpore", "precision", "cards", "paged attention"]
    assert "tokens/s" in columns
    cells = [c.strip() for c in first.strip("|").split("|")]
    assert cells[1:6] == ["smollm2-135m", "2.10.0", "float32", "1 (CPU)", "on (block 16)"]
    assert cells[columns.index("tokens/s")] == "12.5"
    assert second.rstrip(" |").endswith("refused: too big: needs ~34 GiB")
    detail = text.split("\n\n")[1].splitlines()
    assert "TTFT ms" in detail[0] and "recompiles" in detail[0] and len(detail) == 3  # the refused row has none


def test_table_lines_are_aligned():
    text = bench.format_table(("a", "bb"), [["1", "x"], ["22.5", "long text"]])
    assert len({len(line) for line in text.splitlines()}) == 1


# -- end to end -------------------------------------------------------------------------------------
def test_tiny_shape_end_to_end_json(tmp_path):
    env = dict(os.environ, MS_COMPILER_CACHE_ENABLE="0", GLOG_v="3")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmark.py"), "--models", "tiny-llama,minicpm4-8b", "-p", "12",
         "-n", "8", "-b", "2", "-r", "1", "--paged", "on,off", "--json", "--no-progress"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["environment"]["mindspore"] and doc["environment"]["device"] == "CPU"
    rows = doc["rows"]
    assert [(r["model"], r["paged"]) for r in rows] == [("tiny-llama", True), ("tiny-llama", False),
                                                        ("minicpm4-8b", True), ("minicpm4-8b", False)]
    for row in rows[:2]:
        assert row["status"] == "ok", row["reason"]
        m = row["metrics"]
        for key in ("tokens_per_second", "prefill_tokens_per_second", "ttft_ms", "decode_tokens_per_second",
                    "itl_p50_ms", "itl_p99_ms", "peak_memory_gib", "compile_seconds"):
            assert m[key] > 0, key
        assert m["itl_p99_ms"] >= m["itl_p50_ms"]
        assert m["recompiles_after_warmup"] == 0 and m["compiled_graphs"] >= 2
    assert rows[1]["paged_attention"] == "off (block 32)"  # 12 + 8 rounded up to 16
    assert all(r["status"] == "refused" for r in rows[2:])
    assert os.listdir(tmp_path) == [], "the working directory must stay clean"


def test_context_mode_cells_are_model_sparse_context():
    args = benchmark.parse_args(["-m", "minicpm4-8b,minimax-m1-small", "--context", "1024,4096",
                                 "--sparse", "off,current", "-b", "4"])
    cells = benchmark.cells_from_args(args)
    assert [(c.model, c.sparse, c.context) for c in cells[:4]] == [
        ("minicpm4-8b", "off", 1024), ("minicpm4-8b", "off", 4096),
        ("minicpm4-8b", "current", 1024), ("minicpm4-8b", "current", 4096)]
    assert all(c.llm_kwargs()["max_num_seqs"] == 1 for c in cells)  # one long sequence, not the batch
    assert cells[2].llm_kwargs()["sparse_attention"] == "current" and "sparse_attention" not in cells[0].llm_kwargs()


def test_context_mode_end_to_end_json(tmp_path):
    """Long-context timings come out positive, and a context past the model's positions is
    refused, not crashed."""
    env = dict(os.environ, MS_COMPILER_CACHE_ENABLE="0", GLOG_v="3")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmark.py"), "-m", "tiny-llama", "--context", "256,4096",
         "-r", "1", "--json", "--no-progress"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert [(r["context"], r["status"]) for r in rows] == [(256, "ok"), (4096, "refused")]
    m = rows[0]["metrics"]
    assert m["decode_step_ms"] > 0 and m["prefill_seconds"] > 0 and m["peak_memory_gib"] > 0
    assert "max_position_embeddings 1024" in rows[1]["reason"]


def test_eagle_cell_drafts_with_its_head_after_a_paired_plain_run(tmp_path):
    """An eagle cell loads the head named by --speculative-model; its plain run goes without
    drafts (proposer and drafter put back after it), and greedy output is the same both ways."""
    from mindcpm import LLM
    from tests.models.test_eagle import make_draft
    from tests.tiny import VOCAB, make_tiny_model
    target, draft = make_tiny_model(str(tmp_path / "target")), str(tmp_path / "draft")
    make_draft(draft, own_vocab=False)
    cell = bench.Cell(target, batch=2, prompt_len=10, output_len=8, speculative="eagle", speculative_model=draft)
    llm = LLM(model=target, **cell.llm_kwargs())
    run, paired = bench.run_once(llm, cell, bench.workload(cell, np.random.default_rng(3), VOCAB))
    assert run.outputs == paired.outputs and [len(o) for o in run.outputs] == [8, 8]
    assert llm.engine.spec_stats.num_draft_tokens > 0 and llm.engine.drafter is not None
