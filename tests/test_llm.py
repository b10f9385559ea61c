"""vLLM's request semantics end to end through LLM.generate / LLM.stream on a tiny random model.

Stop strings and stop tokens are chosen from the text and tokens the model actually produces
greedily, so every case is forced, not left to the random model's luck. The expected results are
written from vLLM's documented rules: the output ends before the first stop string (or after it
with include_stop_str_in_output), a stop string completed by the max_tokens-th token still
finishes with "stop", no stop fires before min_tokens tokens (a stop string must end in the text
of a later token), the stopping token's text is left out, and a stream never shows text past a
stop. Penalties and prompt logprobs are checked against Hugging Face transformers' logits.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.engine_probe import all_free
from tests.tiny import make_tiny_model

PROMPT = "hello world"
N = 40  # greedy tokens looked at


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_stop")))


@pytest.fixture(scope="module")
def llm(tiny_dir):
    from mindcpm import LLM
    return LLM(model=tiny_dir, progress=False, max_model_len=128, block_size=8, max_num_seqs=4)


def params(**kw):
    from mindcpm import SamplingParams
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", N)
    kw.setdefault("ignore_eos", True)
    return SamplingParams(**kw)


@pytest.fixture(scope="module")
def greedy(llm):
    """(text, token ids, text after each token count) of the plain greedy answer."""
    out = llm.generate(PROMPT, params())[0].outputs[0]
    decode = llm.get_tokenizer().decode
    prefixes = [decode(out.token_ids[:j]) for j in range(N + 1)]
    assert prefixes[-1] == out.text and len(out.token_ids) == N
    return out.text, out.token_ids, prefixes


def first_seen(text: str, start: int, length: int) -> int:
    """The first k >= start whose `length` characters occur in `text` first at k (k = 0 always
    qualifies, so a later one is searched from `start` on) and are plain ASCII."""
    for k in range(start, len(text) - length + 1):
        piece = text[k:k + length]
        if text.find(piece) == k and piece.isascii():
            return k
    raise AssertionError(f"no new {length}-character ASCII substring at or after {start} in {text!r}")


def token_end(prefixes: list[str], char_end: int) -> int:
    """How many tokens it takes for the text to reach `char_end` characters."""
    return next(j for j, p in enumerate(prefixes) if len(p) >= char_end)


def one(llm, **kw):
    return llm.generate(PROMPT, params(**kw))[0].outputs[0]


def test_stop_string_spanning_tokens_is_cut(llm, greedy):
    text, ids, prefixes = greedy
    k = first_seen(text, 4, 3)
    stop = text[k:k + 3]
    # The stop string's characters come from more than one token.
    assert token_end(prefixes, k + 3) - token_end(prefixes, k + 1) >= 1
    out = one(llm, stop=[stop])
    assert (out.text, out.finish_reason, out.stop_reason) == (text[:k], "stop", stop)
    assert out.token_ids == ids[:token_end(prefixes, k + 3)]
    assert all_free(llm)


def test_several_stop_strings_first_in_the_text_wins(llm, greedy):
    text, _, _ = greedy
    early = first_seen(text, 3, 2)
    late = first_seen(text, early + 4, 3)
    stops = [text[late:late + 3], text[early:early + 2]]
    out = one(llm, stop=stops)
    assert (out.text, out.stop_reason) == (text[:early], stops[1])


def test_include_stop_str_in_output(llm, greedy):
    text, _, _ = greedy
    k = first_seen(text, 5, 2)
    out = one(llm, stop=[text[k:k + 2]], include_stop_str_in_output=True)
    assert (out.text, out.finish_reason) == (text[:k + 2], "stop")


def test_stop_completed_by_the_last_allowed_token(llm, greedy):
    text, ids, prefixes = greedy
    k = first_seen(text, 6, 2)
    last = token_end(prefixes, k + 2)  # the token that completes the stop string
    out = one(llm, stop=[text[k:k + 2]], max_tokens=last)
    assert (out.text, out.finish_reason, out.token_ids) == (text[:k], "stop", ids[:last])


def test_no_stop_string_before_min_tokens(llm, greedy):
    text, ids, prefixes = greedy
    m = 6
    floor = len(prefixes[m])  # a stop string must end past the text of the first m tokens
    # A character seen within the first m tokens and again later: without min_tokens it would stop early.
    stop = next(c for c in text[:floor] if c.isascii() and text.find(c, floor) >= 0)
    expected = next(i for i in range(len(text)) if text.startswith(stop, i) and i + len(stop) > floor)
    assert text.find(stop) < floor
    out = one(llm, stop=[stop], min_tokens=m)
    assert (out.text, out.finish_reason) == (text[:expected], "stop")
    assert len(out.token_ids) > m


def test_stream_never_shows_text_past_a_stop(llm, greedy):
    text, _, _ = greedy
    k = first_seen(text, 8, 4)
    p = params(stop=[text[k:k + 4], "\x00never"])
    final = llm.generate(PROMPT, p)[0].outputs[0].text
    shown = ""
    for out in llm.stream(PROMPT, p):
        shown += out.delta
        assert final.startswith(shown)  # no character that a later stop cuts off is ever streamed
    assert shown == final == text[:k] and out.finished
    assert all_free(llm)


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_ids(llm, greedy, include):
    text, ids, prefixes = greedy
    j = next(j for j in range(5, N) if ids[j] not in ids[:j])  # first occurrence of a token
    out = one(llm, stop_token_ids=[ids[j]], include_stop_str_in_output=include)
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (ids[:j + 1], "stop", ids[j])
    assert out.text == (prefixes[j + 1] if include else prefixes[j])


def test_min_tokens_holds_back_a_stop_token(llm, greedy):
    _, ids, _ = greedy
    out = one(llm, stop_token_ids=[ids[1]], min_tokens=4, max_tokens=6)
    assert len(out.token_ids) >= 4 and ids[1] not in out.token_ids[:4]


def test_per_prompt_sampling_params(llm, greedy):
    text, ids, _ = greedy
    k = first_seen(text, 4, 2)
    outs = llm.generate([PROMPT, PROMPT, PROMPT], [params(max_tokens=3), params(stop=[text[k:k + 2]]), params()])
    assert [o.outputs[0].token_ids for o in outs[::2]] == [ids[:3], ids]
    assert outs[1].outputs[0].text == text[:k]
    with pytest.raises(ValueError, match="3 prompts but 2 sampling params"):
        llm.generate([PROMPT] * 3, [params(), params()])


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _penalised(logits, prompt, output, rep, presence, frequency):
    """vLLM's order: repetition (HF: over prompt and output tokens), then presence and
    frequency over the output tokens."""
    x = logits.astype(np.float64).copy()
    seen = sorted(set(prompt) | set(output))
    x[seen] = np.where(x[seen] > 0, x[seen] / rep, x[seen] * rep)
    counts = np.bincount(np.asarray(output, np.int64), minlength=x.shape[-1])[: x.shape[-1]]
    return x - presence * (counts > 0) - frequency * counts


def test_penalties_and_prompt_logprobs_match_transformers(tiny_dir, tmp_path):
    """Prompt logprobs through chunked prefill in a mixed batch (one request wants them, one
    does not), and greedy decoding under penalties, against HF logits of the same tokens."""
    from mindcpm import LLM
    from tests.reference.hf_llama import reference_logits
    llm = LLM(model=tiny_dir, progress=False, max_model_len=128, block_size=8, max_num_seqs=2,
              max_num_batched_tokens=16)
    long_prompt = [256] + [(7 * i + 3) % 250 for i in range(36)]  # three prefill chunks
    other = [256] + list(range(40, 60))
    pen = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4)
    outs = llm.generate([{"prompt_token_ids": long_prompt}, {"prompt_token_ids": other}],
                        [params(max_tokens=12, prompt_logprobs=3, **pen), params(max_tokens=5)])
    gen = outs[0].outputs[0].token_ids
    plp = outs[0].prompt_logprobs
    assert outs[1].prompt_logprobs is None and len(outs[1].outputs[0].token_ids) == 5
    assert len(plp) == len(long_prompt) and plp[0] is None

    (logits,), _ = reference_logits(tiny_dir, [long_prompt + gen], str(tmp_path))
    ref = _log_softmax(logits.astype(np.float64))
    for j in range(1, len(long_prompt)):
        entry, row = plp[j], ref[j - 1]
        assert entry[long_prompt[j]] == pytest.approx(row[long_prompt[j]], abs=1e-4)
        top = np.argsort(-row)[:3]
        assert all(entry[int(t)] == pytest.approx(row[t], abs=1e-4) for t in top if row[t] - row[top[2]] > 1e-3)
    p = len(long_prompt)
    for step, token in enumerate(gen):
        scores = _penalised(logits[p + step - 1], long_prompt, gen[:step], **{
            "rep": pen["repetition_penalty"], "presence": pen["presence_penalty"],
            "frequency": pen["frequency_penalty"]})
        assert scores[token] >= scores.max() - 1e-4, f"step {step}: token {token} is not the penalised arg-max"
    assert all_free(llm)
