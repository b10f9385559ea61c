"""The model runner's decode steps chained on the device (ModelRunner._launch_next): a greedy
batch's next step starts on this step's arg-max ids before the host has read them."""
from __future__ import annotations

import pytest

ms = pytest.importorskip("mindspore")
from tests.engine_probe import all_free, tokens  # noqa: E402
from tests.quant.test_quantized_model import dequantized_checkpoint  # noqa: E402
from tests.reference.hf_llama import reference_logits_each  # noqa: E402
from tests.tiny import TINY_LLAMA, make_llm, make_tiny_model  # noqa: E402

# A head of 40000 x 512 int8 codes (20 MB) takes about a millisecond: a step that read its
# input ids before the previous step's arg-max was written would see other ids.
WIDE_HEAD = dict(TINY_LLAMA, vocab_size=40000, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                 tie_word_embeddings=True)
PROMPTS = [[256, 5, 9, 33, 7], list(range(2, 40)), [256] + list(range(100, 117))]
STEPS = 12


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from mindcpm.ops.cpu_kernels import kernels_available
    if not kernels_available():
        pytest.skip("no g++ to build the CPU kernels")
    tmp = tmp_path_factory.mktemp("chained")
    src = make_tiny_model(str(tmp / "float"), WIDE_HEAD)
    llm = make_llm(src, kernels="on", enable_prefix_caching=False, quantization="int8", max_model_len=256)
    ref_dir = str(tmp / "dequantized")
    dequantized_checkpoint(llm, src, ref_dir)
    ((_, ref_tokens),) = reference_logits_each([ref_dir], PROMPTS, str(tmp), STEPS)
    return llm, ref_tokens


def test_chained_decode_steps_give_transformers_greedy_tokens(quantized, fp32_gemm):
    from mindcpm import SamplingParams
    llm, ref_tokens = quantized
    runner = llm.engine.runner
    assert runner.chain_decode
    before = dict(runner.chain_counts)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True))
    assert tokens(outs) == ref_tokens
    # Every decode step but the first is the one launched before it, across the block boundaries
    # at 16 and 48 tokens (the next block is reserved a step early).
    assert runner.chain_counts["used"] - before["used"] == STEPS - 2
    assert runner.chain_counts["discarded"] == before["discarded"]
    assert all_free(llm)


def test_a_chained_step_is_dropped_when_a_sequence_stops(quantized, fp32_gemm):
    """The first prompt stops on its fourth token (a stop token id the host sees only after the
    next step was launched): that step's outputs are dropped and the others go on unchained."""
    from mindcpm import SamplingParams
    llm, ref_tokens = quantized
    runner = llm.engine.runner
    stop = ref_tokens[0][3]
    assert stop not in ref_tokens[0][:3]
    before = dict(runner.chain_counts)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        [SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, stop_token_ids=[stop])]
                        + [SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)] * 2)
    got = tokens(outs)
    assert got[0] == ref_tokens[0][:4] and got[1:] == ref_tokens[1:]
    assert runner.chain_counts["discarded"] - before["discarded"] >= 1


def test_sampled_batches_are_not_chained(quantized):
    from mindcpm import SamplingParams
    llm, _ = quantized
    runner = llm.engine.runner
    before = dict(runner.chain_counts)
    llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                 SamplingParams(temperature=0.8, seed=3, max_tokens=STEPS, ignore_eos=True))
    assert runner.chain_counts == before and runner.chained is None
