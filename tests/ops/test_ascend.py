"""The ascend attention backend against the documented contracts of its kernels, in fp16.

No NPU here: tests/ascend_standins.py replaces ReshapeAndCache, PagedAttention and
FlashAttentionScore with CPU stand-ins written from the ops' documentation (checked against
MindSpore's own examples in tests/ops/test_ascend_standins.py), which assert the documented
shapes/dtypes/layouts when traced and refuse fp32 as the real kernels do. A tiny random Llama
(GQA 4:2, head_dim 32) on the ascend backend in fp16, compiled as the engine compiles it, must
give the native backend's fp16 logits and transformers' fp32 logits within the fp16 rounding,
for a whole prefill, a padded multi-prompt prefill, a prompt prefilled in two chunks, and decode
steps of two rows with different tables and lengths.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.ascend_standins import install_standins
from tests.reference.hf_llama import make_checkpoint, reference_logits

CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False)  # head_dim 32
BLOCK = 16  # the smallest block size Ascend's PagedAttention takes
NUM_BLOCKS = 16
PAD_BLOCK = NUM_BLOCKS  # the spare block that padding tokens write to
TABLE_WIDTH = 4  # blocks per row in every step
PREFILL_WIDTH = 32
DECODE_STEPS = 3

# Sequence -> (total tokens, its blocks: scattered, not in order).
SEQS = {"A": (21 + DECODE_STEPS, [5, 2]), "B": (7, [9]), "C": (19, [0, 12]), "D": (36 + DECODE_STEPS, [7, 3, 14])}
# Each stage: the steps it runs, a step being [(sequence, first position, number of tokens)] per row.
STAGES = {
    "single prompt": [[("A", 0, 21)]],
    "padded batch": [[("B", 0, 7), ("C", 0, 19)]],
    "two chunks": [[("D", 0, 20)], [("D", 20, 16)]],
    "decode": [[("A", 21 + i, 1), ("D", 36 + i, 1)] for i in range(DECODE_STEPS)],
}
# fp16 keeps 11 significant bits (eps 2^-10). Two layers of norm/matmul/attention/MLP put the
# logits off transformers' fp32 by a few eps of their size; measured here: at most 0.0096 on
# logits up to 4.0, 3.2 eps x max(1, |logit|). The bound allows 8 (the stand-ins round once from
# fp32, and gave native's fp16 logits exactly).
EPS16 = float(np.finfo(np.float16).eps)


def _tolerance(reference: np.ndarray) -> float:
    return 8 * EPS16 * max(1.0, float(np.abs(reference).max()))


def _tokens():
    rng = np.random.default_rng(7)
    return {name: rng.integers(1, CONFIG["vocab_size"], n).tolist() for name, (n, _) in SEQS.items()}


def _step_inputs(tokens, step):
    """The step's inputs in the order of mindcpm.ops.device.STEP_INPUTS, and its width."""
    rows = len(step)
    width = PREFILL_WIDTH if any(n > 1 for _, _, n in step) else 1
    ids = np.zeros((rows, width), np.int32)
    positions = np.full((rows, width), -1, np.int32)
    slots = np.full((rows, width), PAD_BLOCK * BLOCK, np.int32)
    tables = np.full((rows, TABLE_WIDTH), PAD_BLOCK, np.int32)
    kv_lens, q_lens = np.ones(rows, np.int32), np.ones(rows, np.int32)
    for i, (name, start, n) in enumerate(step):
        table = np.asarray(SEQS[name][1], np.int32)
        pos = np.arange(start, start + n, dtype=np.int32)
        ids[i, :n] = tokens[name][start:start + n]
        positions[i, :n] = pos
        slots[i, :n] = table[pos // BLOCK] * BLOCK + pos % BLOCK
        tables[i, :len(table)] = table
        kv_lens[i], q_lens[i] = start + n, n
    logits_rows = np.arange(rows * width, dtype=np.int32)
    return (ids, positions, kv_lens, q_lens, slots.reshape(-1), tables, logits_rows), width


def _run_script(model_dir, attention, tokens):
    """Runs every stage on one fresh fp16 model (stages share its cache); returns per stage the
    logits of each (sequence, position) computed, and the stand-ins' trace-time calls per stage."""
    import mindspore as ms
    from mindspore import Tensor
    from mindcpm.config import ModelConfig
    from mindcpm.engine.runner import _CompiledStep
    from mindcpm.loader import load_checkpoint
    from mindcpm.models.minicpm import MiniCPMForCausalLM
    from mindcpm.ops import Device
    from tests.ascend_standins import CALLS

    device = Device(dtype=ms.float16, block_size=BLOCK, cache_blocks=NUM_BLOCKS + 1, attention=attention)
    model = MiniCPMForCausalLM(ModelConfig.from_dir(model_dir), device)
    load_checkpoint(model, model_dir, ms.float16, progress=False)
    device.after_load(model)
    step_fns = {}  # a compiled step runs one input-shape bucket (as in the runner)
    logits, calls = {}, {}
    for stage, steps in STAGES.items():
        before = CALLS.copy()
        out = {}
        for step in steps:
            inputs, width = _step_inputs(tokens, step)
            shapes = tuple(a.shape for a in inputs)
            if shapes not in step_fns:
                step_fns[shapes] = _CompiledStep(model, shapes, device.jit_options())
            result = step_fns[shapes](*[Tensor(a) for a in inputs])[0].asnumpy()  # (logits, arg-max)
            for i, (name, start, n) in enumerate(step):
                for j in range(n):
                    out[(name, start + j)] = result[i * width + j]
        logits[stage] = out
        calls[stage] = CALLS - before
    return logits, calls


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ascend_llama"))
    make_checkpoint(CONFIG, path, seed=3)
    return path


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    tokens = _tokens()
    names = list(SEQS)
    ref, _ = reference_logits(model_dir, [tokens[n] for n in names], str(tmp_path_factory.mktemp("ref")))
    return tokens, dict(zip(names, ref))


@pytest.fixture(scope="module")
def runs(model_dir, reference):
    from mindcpm.ops import setup_runtime
    setup_runtime("cpu")
    tokens, _ = reference
    with pytest.MonkeyPatch.context() as mp:
        # No compile cache: its entries are keyed by the source files and the order of compiles in
        # the process, not by the model, so another test's tiny model's graph would be loaded for
        # this one (seen: "Not same shape in device address", or silently NaN logits).
        mp.setenv("MS_COMPILER_CACHE_ENABLE", "0")
        results = {"native": _run_script(model_dir, "native", tokens)}
        install_standins(mp)
        results["ascend"] = _run_script(model_dir, "ascend", tokens)
    return results


@pytest.mark.parametrize("stage", list(STAGES))
def test_ascend_fp16_logits_match_native_and_transformers(runs, reference, stage):
    _, ref = reference
    ascend, native = runs["ascend"][0][stage], runs["native"][0][stage]
    assert ascend.keys() == native.keys()
    for (name, pos), got in ascend.items():
        want = ref[name][pos]
        assert np.isfinite(got).all(), (stage, name, pos)
        np.testing.assert_allclose(got, native[(name, pos)], atol=_tolerance(want), rtol=0,
                                   err_msg=f"{stage} {name}@{pos} vs native fp16")
        np.testing.assert_allclose(got, want, atol=_tolerance(want), rtol=0,
                                   err_msg=f"{stage} {name}@{pos} vs transformers fp32")


def test_standins_were_traced_into_the_graphs(runs):
    """Counted when each step graph is traced, once per layer: the two prefill shapes use
    FlashAttentionScore, the decode shape PagedAttention, all write with ReshapeAndCache; the
    second chunk reuses the first prefill graph (same shapes), so nothing is traced for it."""
    _, calls = runs["ascend"]
    n = CONFIG["num_hidden_layers"]
    assert dict(calls["single prompt"]) == {"ReshapeAndCache": n, "FlashAttentionScore": n}, calls
    assert dict(calls["padded batch"]) == {"ReshapeAndCache": n, "FlashAttentionScore": n}, calls
    assert dict(calls["two chunks"]) == {}, calls
    assert dict(calls["decode"]) == {"ReshapeAndCache": n, "PagedAttention": n}, calls


def test_engine_tokens_and_logprobs_equal_native(model_dir, monkeypatch):
    """The whole LLM API (paged cache, batching, chunked prefill, decode) on the ascend path, fp16."""
    from mindcpm import LLM, SamplingParams
    from tests.tiny import write_byte_tokenizer
    write_byte_tokenizer(model_dir)
    prompts = [{"prompt_token_ids": [1 + i + j for j in range(n)]} for i, n in enumerate([5, 23, 11])]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    results = {}
    for backend in ("native", "ascend"):
        calls = install_standins(monkeypatch)
        llm = LLM(model=model_dir, attention=backend, dtype="float16", kernels="off", max_model_len=128,
                  max_num_batched_tokens=16, max_num_seqs=3, progress=False)
        assert llm.engine.runner.backend_name == backend
        results[backend] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)]
        if backend == "ascend":
            assert calls  # the stand-ins ran, so the ascend calling code was exercised
    for (nat_ids, nat_lp), (asc_ids, asc_lp) in zip(results["native"], results["ascend"]):
        assert asc_ids == nat_ids
        for a, b in zip(asc_lp, nat_lp):
            assert a.keys() == b.keys()
            assert all(abs(a[t] - b[t]) < _tolerance(np.array([b[t]])) for t in a)


def test_ascend_block_and_head_sizes_refused_with_one_line():
    from mindcpm.ops import Device
    with pytest.raises(ValueError, match=r"block_size 8 is not supported by Ascend's PagedAttention"):
        Device("ascend", block_size=8)
    from mindcpm.ops.device import check_ascend_head_dim
    with pytest.raises(ValueError, match="head_dim 40 is not supported by Ascend's FlashAttentionScore"):
        check_ascend_head_dim(40, 16)
    with pytest.raises(ValueError, match="exceeds Ascend's PagedAttention limit"):
        check_ascend_head_dim(256, 128)
