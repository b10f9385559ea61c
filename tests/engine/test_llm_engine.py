"""The full engine on a tiny random model: batching, preemption, abort, seeds, stop strings."""
from __future__ import annotations

import pytest

from tests.engine_probe import all_free, tokens
from tests.tiny import make_tiny_model, tiny_llm

PROMPTS = [[256] + list(range(3 + i, 3 + i + n)) for i, n in enumerate([3, 17, 9, 30, 1, 12])]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_engine")))


_llm = tiny_llm






@pytest.fixture(scope="module")
def alone(tiny_dir):
    from mindcpm import SamplingParams
    llm = _llm(tiny_dir, max_num_seqs=1)
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True)
    return ([tokens(llm.generate({"prompt_token_ids": p}, greedy))[0] for p in PROMPTS],
            [tokens(llm.generate({"prompt_token_ids": p}, seeded))[0] for p in PROMPTS])


@pytest.mark.parametrize("kw", [dict(max_num_seqs=6),
                                dict(max_num_seqs=4, max_num_batched_tokens=16),
                                dict(max_num_seqs=6, kv_cache_gib=1e-9)],  # 8 blocks: forces preemption
                         ids=["batched", "chunked", "tiny-pool"])
def test_concurrent_equals_alone(tiny_dir, alone, kw):
    from mindcpm import SamplingParams
    llm = _llm(tiny_dir, **kw)
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    assert tokens(llm.generate(prompts, greedy)) == alone[0]
    assert tokens(llm.generate(prompts, seeded)) == alone[1]
    assert all_free(llm)


def test_abort_frees_blocks(tiny_dir):
    from mindcpm import SamplingParams
    llm = _llm(tiny_dir)
    stream = llm.stream({"prompt_token_ids": PROMPTS[3]}, SamplingParams(temperature=0.0, max_tokens=30,
                                                                        ignore_eos=True))
    next(stream)
    assert not all_free(llm)
    stream.close()
    assert all_free(llm) and not llm.engine.has_unfinished()


def test_stream_concatenates_to_text_and_stop_string(tiny_dir):
    from mindcpm import SamplingParams
    llm = _llm(tiny_dir)
    params = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)
    full = llm.generate("hello world", params)[0].outputs[0]
    pieces = list(llm.stream("hello world", params))
    assert "".join(p.delta for p in pieces) == full.text and pieces[-1].finished
    # Stop at a substring of the greedy text: the output ends right before it.
    stop = full.text[5:8]
    if stop and full.text.find(stop) == 5:
        out = llm.generate("hello world", SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True,
                                                         stop=[stop]))[0].outputs[0]
        assert out.text == full.text[:5] and out.finish_reason == "stop"


def test_prompt_too_long_and_bad_ids(tiny_dir):
    from mindcpm import SamplingParams
    llm = _llm(tiny_dir)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * 64}, SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [5, 100000]}, SamplingParams())
    assert all_free(llm) and not llm.engine.has_unfinished()


def test_no_recompilation_in_steady_state(tiny_dir):
    from mindcpm import SamplingParams
    llm = _llm(tiny_dir, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:4]]
    llm.generate(prompts, params)
    shapes = set(llm.engine.runner.compiled_shapes)
    # Same lengths, other tokens (the same ones would hit the prefix cache and prefill less).
    llm.generate([{"prompt_token_ids": [(t + 50) % 256 for t in p]} for p in PROMPTS[:4]], params)
    assert llm.engine.runner.compiled_shapes == shapes


def test_a_compiled_step_refuses_another_shape(tiny_dir):
    # MindSpore's inference path would run the cached graph on the wrong shapes without a word.
    import numpy as np
    from mindspore import Tensor
    from mindcpm import SamplingParams
    llm = _llm(tiny_dir, max_num_seqs=1)
    llm.generate({"prompt_token_ids": PROMPTS[1]}, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    runner = llm.engine.runner
    shapes, step = next(iter(runner.steps.items()))
    inputs = [Tensor(np.zeros(s, np.int32)) for s in shapes]
    inputs[0] = Tensor(np.zeros((shapes[0][0] * 2, *shapes[0][1:]), np.int32))
    with pytest.raises(ValueError, match="compiled for input shapes"):
        step(*inputs)
