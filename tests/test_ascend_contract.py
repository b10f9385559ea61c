"""The ascend attention backend against the documented contracts of its kernels.

No NPU here: tests/ascend_standins.py replaces ReshapeAndCache, PagedAttention and
FlashAttentionScore with CPU stand-ins written from the ops' documentation, which assert the
documented shapes/dtypes/layouts when traced. A tiny random Llama (GQA 4:2, head_dim 32) on the
ascend backend, compiled with ms.jit as the engine compiles it, must give the native backend's
and transformers' logits (fp32) for a whole prefill, a padded multi-prompt prefill, a prompt
prefilled in two chunks, and decode steps of two rows with different tables and lengths.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from tests.ascend_standins import (CALLS, FlashAttentionScoreStandIn, PagedAttentionStandIn,
                                   ReshapeAndCacheStandIn, install_standins)
from tests.reference.hf_llama import make_checkpoint, reference_logits

CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False)  # head_dim 32
BLOCK = 8
NUM_BLOCKS = 16
PAD_BLOCK = NUM_BLOCKS  # the spare block that padding tokens write to
TABLE_WIDTH = 4  # blocks per row in every step
PREFILL_WIDTH = 16
DECODE_STEPS = 3

# Sequence -> (total tokens, its blocks: scattered, not in order).
SEQS = {"A": (13 + DECODE_STEPS, [5, 2]), "B": (7, [9]), "C": (11, [0, 12]), "D": (20 + DECODE_STEPS, [7, 3, 14])}
# Each stage: the steps it runs, a step being [(sequence, first position, number of tokens)] per row.
STAGES = {
    "single prompt": [[("A", 0, 13)]],
    "padded batch": [[("B", 0, 7), ("C", 0, 11)]],
    "two chunks": [[("D", 0, 12)], [("D", 12, 8)]],
    "decode": [[("A", 13 + i, 1), ("D", 20 + i, 1)] for i in range(DECODE_STEPS)],
}
ATOL = 1e-5


def _tokens():
    rng = np.random.default_rng(7)
    return {name: rng.integers(1, CONFIG["vocab_size"], n).tolist() for name, (n, _) in SEQS.items()}


def _step_inputs(tokens, step):
    rows = len(step)
    width = PREFILL_WIDTH if any(n > 1 for _, _, n in step) else 1
    ids = np.zeros((rows, width), np.int32)
    positions = np.full((rows, width), -1, np.int32)
    slots = np.full((rows, width), PAD_BLOCK * BLOCK, np.int32)
    tables = np.full((rows, TABLE_WIDTH), PAD_BLOCK, np.int32)
    for i, (name, start, n) in enumerate(step):
        table = np.asarray(SEQS[name][1], np.int32)
        pos = np.arange(start, start + n, dtype=np.int32)
        ids[i, :n] = tokens[name][start:start + n]
        positions[i, :n] = pos
        slots[i, :n] = table[pos // BLOCK] * BLOCK + pos % BLOCK
        tables[i, :len(table)] = table
    return ids, positions, slots.reshape(-1), tables, np.arange(rows * width, dtype=np.int32), width


def _run_script(model_dir, backend_factory, cache_shape_fn, tokens):
    """Runs every stage on one fresh model (stages share its cache); returns per stage the logits
    of each (sequence, position) computed, and for the stand-ins the trace-time calls per stage."""
    import mindspore as ms
    from mindspore import Tensor
    from mindcpm.config import ModelConfig
    from mindcpm.engine.runner import _CompiledStep
    from mindcpm.loader import load_checkpoint
    from mindcpm.models.minicpm import MiniCPMForCausalLM

    cfg = ModelConfig.from_dir(model_dir)
    cache_shape = cache_shape_fn(NUM_BLOCKS + 1, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    model = MiniCPMForCausalLM(cfg, backend_factory, cache_shape, BLOCK, ms.float32)
    load_checkpoint(model, model_dir, ms.float32, progress=False)
    step_fns = {}  # a compiled step runs one input-shape bucket (as in the runner)
    logits, calls = {}, {}
    for stage, steps in STAGES.items():
        before = CALLS.copy()
        out = {}
        for step in steps:
            *inputs, width = _step_inputs(tokens, step)
            shapes = tuple(a.shape for a in inputs)
            if shapes not in step_fns:
                step_fns[shapes] = _CompiledStep(model, shapes)
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
    from mindcpm.ops.ascend import AscendAttention
    from mindcpm.ops.native import NativeAttention
    setup_runtime()
    tokens, _ = reference
    with pytest.MonkeyPatch.context() as mp:
        # No compile cache: its entries are keyed by the source files and the order of compiles in
        # the process, not by the model, so another test's tiny model's graph would be loaded for
        # this one (seen: "Not same shape in device address", or silently NaN logits).
        mp.setenv("MS_COMPILER_CACHE_ENABLE", "0")
        results = {"native": _run_script(model_dir, NativeAttention, NativeAttention.cache_shape, tokens)}
        install_standins(mp)
        # As the engine builds it: the backend class, called with no arguments.
        results["ascend"] = _run_script(model_dir, AscendAttention, AscendAttention.cache_shape, tokens)
    return results


@pytest.mark.parametrize("stage", list(STAGES))
def test_ascend_logits_match_native_and_transformers(runs, reference, stage):
    _, ref = reference
    ascend, native = runs["ascend"][0][stage], runs["native"][0][stage]
    assert ascend.keys() == native.keys()
    for (name, pos), got in ascend.items():
        assert np.isfinite(got).all(), (stage, name, pos)
        np.testing.assert_allclose(got, native[(name, pos)], atol=ATOL, rtol=0, err_msg=f"{stage} {name}@{pos} vs native")
        np.testing.assert_allclose(got, ref[name][pos], atol=ATOL, rtol=0, err_msg=f"{stage} {name}@{pos} vs transformers")


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


def test_heads_given_at_construction(runs, reference, model_dir):
    """AscendAttention(num_heads, num_kv_heads, scale) creates its kernels in __init__; same logits."""
    from mindcpm.ops.ascend import AscendAttention
    tokens, _ = reference
    head_dim = CONFIG["hidden_size"] // CONFIG["num_attention_heads"]
    factory = functools.partial(AscendAttention, num_heads=CONFIG["num_attention_heads"],
                                num_kv_heads=CONFIG["num_key_value_heads"], scale=1.0 / np.sqrt(head_dim))
    with pytest.MonkeyPatch.context() as mp:
        install_standins(mp)
        assert isinstance(factory().paged_attention, PagedAttentionStandIn)
        logits, _ = _run_script(model_dir, factory, AscendAttention.cache_shape, tokens)
    native = runs["native"][0]
    for stage in STAGES:
        for key, got in logits[stage].items():
            np.testing.assert_allclose(got, native[stage][key], atol=ATOL, rtol=0, err_msg=f"{stage} {key}")


@pytest.mark.parametrize("width", [PREFILL_WIDTH, 1], ids=["prefill", "decode"])
def test_real_kernels_infer_accepts_the_fp16_calls(width):
    """The real primitives' shape/dtype inference runs on CPU before kernel selection fails: our
    fp16 calls must get through all of it and stop only at "Unsupported op [...] on CPU".
    (It checks less than the documentation, e.g. not the mask dtype, but it does check the
    ReshapeAndCache token count and the fp16/bf16 dtypes.)"""
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn
    from mindcpm.ops import on_ascend
    from mindcpm.ops.ascend import AscendAttention
    if on_ascend():
        pytest.skip("the kernels exist here; the model tests run them")
    b, hq, hkv, d = 2, 4, 2, 32
    shape = AscendAttention.cache_shape(NUM_BLOCKS + 1, BLOCK, hkv, d)

    class Layer(nn.Cell):
        def __init__(self):
            super().__init__()
            self.backend = AscendAttention()
            self.k_cache = Parameter(Tensor(np.zeros(shape), ms.float16), name="k_cache", requires_grad=False)
            self.v_cache = Parameter(Tensor(np.zeros(shape), ms.float16), name="v_cache", requires_grad=False)

        @ms.jit
        def construct(self, q, k, v, positions, slots, tables):
            return self.backend(q, k, v, self.k_cache, self.v_cache, positions, slots, tables, BLOCK, 0.125)

    q = Tensor(np.zeros((b, width, hq, d)), ms.float16)
    kv = Tensor(np.zeros((b, width, hkv, d)), ms.float16)
    positions = Tensor(np.zeros((b, width), np.int32))
    slots = Tensor(np.full(b * width, PAD_BLOCK * BLOCK, np.int32))
    tables = Tensor(np.full((b, TABLE_WIDTH), PAD_BLOCK, np.int32))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MS_COMPILER_CACHE_ENABLE", "0")
        with pytest.raises(RuntimeError, match=r"Unsupported op \[(ReshapeAndCache|PagedAttention|FlashAttentionScore)\] on CPU"):
            Layer()(q, kv, kv, positions, slots, tables)


# -- the stand-ins enforce the documented contracts (PyNative, no model) ------------------------

def _cache(shape, dtype):
    import mindspore as ms
    from mindspore import Parameter, Tensor
    return Parameter(Tensor(np.zeros(shape, np.float32), dtype), name="cache", requires_grad=False)


def test_reshape_and_cache_counts_tokens_as_prod_of_leading_dims():
    import mindspore as ms
    from mindspore import Tensor
    t, n, d, bs = 3, 2, 16, 4
    cache = _cache((2, bs, n, d), ms.float32)
    key = np.arange(t * n * d, dtype=np.float32).reshape(t, n, d)
    slots = Tensor(np.array([5, 0, 2], np.int32))
    with pytest.raises(AssertionError, match="key num_tokens: 6"):  # the docstring's (T, N, D) layout
        ReshapeAndCacheStandIn()(Tensor(key), None, cache, None, slots)
    ReshapeAndCacheStandIn()(Tensor(key.reshape(t, n * d)), None, cache, None, slots)
    got = cache.asnumpy()
    np.testing.assert_array_equal(got[1, 1], key[0])  # slot 5 = block 1, offset 1
    np.testing.assert_array_equal(got[0, 0], key[1])
    np.testing.assert_array_equal(got[0, 2], key[2])
    with pytest.raises(AssertionError, match="int32"):
        ReshapeAndCacheStandIn()(Tensor(key.reshape(t, n * d)), None, cache, None, Tensor(np.array([5, 0, 2])))


def test_flash_attention_standin_rejects_undocumented_inputs():
    import mindspore as ms
    from mindspore import Tensor
    q = Tensor(np.zeros((1, 4, 2 * 32), np.float32))
    kv = Tensor(np.zeros((1, 6, 32), np.float32))
    fa = FlashAttentionScoreStandIn(head_num=2, scale_value=0.5, input_layout="BSH")
    out = fa(q, kv, kv, None, None, None, Tensor(np.zeros((1, 1, 4, 6), np.uint8)))[3]
    assert out.shape == (1, 4, 64)
    with pytest.raises(AssertionError, match="bool or uint8"):
        fa(q, kv, kv, None, None, None, Tensor(np.zeros((1, 1, 4, 6), np.float32)))
    with pytest.raises(AssertionError, match="attn_mask shape"):
        fa(q, kv, kv, None, None, None, Tensor(np.zeros((1, 1, 6, 4), np.uint8)))
    with pytest.raises(AssertionError, match="multiple of 16"):
        FlashAttentionScoreStandIn(head_num=8, scale_value=0.5)(q, kv, kv)  # D = 64 / 8
    with pytest.raises(AssertionError, match="bfloat16|Float16|dtype"):
        FlashAttentionScoreStandIn(head_num=2, scale_value=0.5)(Tensor(np.zeros((1, 4, 64), np.int32)), kv, kv)
    # A query row with every key discarded: undefined, so the stand-in poisons it.
    mask = np.zeros((1, 1, 4, 6), np.uint8)
    mask[0, 0, 2] = 1
    out = fa(Tensor(np.ones((1, 4, 64), np.float32)), kv, kv, None, None, None, Tensor(mask))[3].asnumpy()
    assert np.isnan(out[0, 2]).all() and np.isfinite(out[0, [0, 1, 3]]).all()


def test_paged_attention_standin_rejects_undocumented_inputs():
    import mindspore as ms
    from mindspore import Tensor
    cache = _cache((3, 4, 2, 16), ms.float32)
    pa = PagedAttentionStandIn(head_num=4, scale_value=0.25, kv_head_num=2)
    q = Tensor(np.ones((2, 4, 16), np.float32))
    tables = Tensor(np.array([[0, 1], [2, 0]], np.int32))
    out = pa(q, cache, cache, tables, Tensor(np.array([5, 1], np.int32))).asnumpy()
    assert out.shape == (2, 4, 16) and np.isfinite(out).all()
    out = pa(q, cache, cache, tables, Tensor(np.array([0, 9], np.int32))).asnumpy()  # empty / past the table
    assert np.isnan(out).all()
    with pytest.raises(AssertionError, match="context_lens must be int32"):
        pa(q, cache, cache, tables, Tensor(np.array([5, 1], np.int64)))
    with pytest.raises(AssertionError, match="query must be"):
        pa(Tensor(np.ones((2, 1, 64), np.float32)), cache, cache, tables, Tensor(np.array([5, 1], np.int32)))


def test_engine_tokens_and_logprobs_equal_native(model_dir, monkeypatch):
    """The whole LLM API (paged cache, batching, chunked prefill, decode) on the ascend path."""
    from mindcpm import LLM, SamplingParams
    from tests.tiny import write_byte_tokenizer
    write_byte_tokenizer(model_dir)
    prompts = [{"prompt_token_ids": [1 + i + j for j in range(n)]} for i, n in enumerate([5, 23, 11])]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    results = {}
    for backend in ("native", "ascend"):
        calls = install_standins(monkeypatch)
        llm = LLM(model=model_dir, attention=backend, max_model_len=128, max_num_batched_tokens=16,
                  max_num_seqs=3, progress=False)
        assert llm.engine.runner.backend_name == backend
        results[backend] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)]
        if backend == "ascend":
            assert calls  # the stand-ins ran, so the ascend calling code was exercised
    for (nat_ids, nat_lp), (asc_ids, asc_lp) in zip(results["native"], results["ascend"]):
        assert asc_ids == nat_ids
        for a, b in zip(asc_lp, nat_lp):
            assert a.keys() == b.keys()
            assert all(abs(a[t] - b[t]) < 1e-5 for t in a)
