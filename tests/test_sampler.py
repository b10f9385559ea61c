"""Sampler against a numpy reference written from the semantics (vLLM's), not from the code.

Reference semantics (float64):
  penalties: repetition (HF, prompt+output ids: x/r if x>0 else x*r), then -freq*count and
  -presence*[count>0] over output ids; then min_tokens: while len(output) < min_tokens the
  stop_token_ids and the EOS ids are -inf (also with ignore_eos, as in vLLM).
  temperature 0: argmax, ties -> lowest id.  Else z = x/T, p = softmax(z);
  top_k keeps z >= k-th largest z; top_p (on the top_k-renormalised p) keeps a token iff the mass
  of strictly more likely tokens is < top_p; min_p keeps p >= min_p * max p; the sample is the
  smallest id i with cdf[i] > u, cdf the cumulative sum in id order of the renormalised kept p.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import mindspore as ms

from mindcpm.engine import sampler as sampler_mod
from mindcpm.engine.sampler import SampleOutput, Sampler, SampleRequest, make_rng, topk_logprobs
from mindcpm.sampling import SamplingParams

EOS = [3, 7]
MARGIN = 3e-6  # a reference decision this close to its boundary may go either way in fp32


# ---------------------------------------------------------------------------------------------
# numpy reference


def ref_process(logits, params: SamplingParams, prompt_ids, output_ids, eos_ids=EOS):
    x = np.asarray(logits, dtype=np.float64).copy()
    v = x.shape[0]
    r = params.repetition_penalty
    if r != 1.0:
        for t in set(prompt_ids) | set(output_ids):
            x[t] = x[t] / r if x[t] > 0 else x[t] * r
    counts = np.bincount(np.asarray(output_ids, dtype=np.int64), minlength=v).astype(np.float64)
    x -= params.frequency_penalty * counts
    x -= params.presence_penalty * (counts > 0)
    if len(output_ids) < params.min_tokens:
        banned = list(params.stop_token_ids) + list(eos_ids)
        x[banned] = -np.inf
    return x


def ref_sample(x, params: SamplingParams, u: float, details: bool = False):
    """(token, ambiguous): ambiguous when some decision is within MARGIN of its boundary.
    With details, also the cdf (over ids) it sampled from."""
    if params.temperature == 0:
        tok = int(np.argmax(x))  # np.argmax: first maximal index
        return (tok, False, np.arange(x.shape[0]) >= tok) if details else (tok, False)
    v = x.shape[0]
    z = x / params.temperature
    finite = np.isfinite(z)
    p = np.where(finite, np.exp(z - z[finite].max()), 0.0)
    p /= p.sum()
    keep = finite.copy()
    amb = False
    if 0 < params.top_k < v:
        kth = np.sort(z)[::-1][params.top_k - 1]
        keep &= z >= kth
    if params.top_p < 1.0:
        pk = np.where(keep, p, 0.0)
        pk /= pk.sum()
        vals, inv = np.unique(z[keep], return_inverse=True)  # ascending distinct kept values
        mass = np.bincount(inv, weights=pk[keep])
        above = np.concatenate([np.cumsum(mass[::-1])[::-1][1:], [0.0]])  # strictly above each value
        amb |= bool(np.any(np.abs(above - params.top_p) < MARGIN))
        cut = vals[above < params.top_p].min()
        keep &= z >= cut
    if params.min_p > 0.0:
        ratio = p / p.max()
        amb |= bool(np.any(np.abs(ratio - params.min_p) < MARGIN))
        keep &= ratio >= params.min_p
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    cdf = np.cumsum(q)
    amb |= bool(np.any(np.abs(cdf[:-1] - u) < MARGIN))
    tok = int(np.searchsorted(cdf, u, side="right"))
    return (tok, amb, cdf) if details else (tok, amb)


def ref_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module", autouse=True)
def no_compile_cache():
    """MindSpore's compile cache names graphs by their compile order in the process
    (compile_cache_<n>.mindir) and checks only the entry script's imports (pytest's), so a run
    that compiles in another order (-k, another file first, a code change) loads wrong graphs.
    Off for this module; the graphs here compile in well under a second each."""
    old = os.environ.get("MS_COMPILER_CACHE_ENABLE")
    os.environ["MS_COMPILER_CACHE_ENABLE"] = "0"
    yield
    if old is None:
        del os.environ["MS_COMPILER_CACHE_ENABLE"]
    else:
        os.environ["MS_COMPILER_CACHE_ENABLE"] = old


@pytest.fixture(scope="module")
def sampler():
    return Sampler(EOS)


def first_u(seed):
    return float(np.random.default_rng(seed).random())


def check_batch(sampler, logits, params_list, prompts, outputs, seeds):
    """Sample once with one fresh generator per row; compare every row with the reference."""
    reqs = [SampleRequest(p, pr, out, np.random.default_rng(s))
            for p, pr, out, s in zip(params_list, prompts, outputs, seeds)]
    got = sampler(ms.Tensor(logits.astype(np.float32)), reqs, -1).token_ids
    n_amb = 0
    for i, (p, pr, out, s) in enumerate(zip(params_list, prompts, outputs, seeds)):
        x = ref_process(logits[i], p, pr, out)
        want, amb = ref_sample(x, p, first_u(s))
        if amb:
            n_amb += 1
        else:
            assert got[i] == want, (i, p, got[i], want)
    return n_amb


def random_logits(rng, n, v, scale=3.0):
    return (rng.standard_normal((n, v)) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# greedy


def test_greedy_is_argmax_lowest_id_on_ties(sampler):
    rng = np.random.default_rng(0)
    n, v = 8, 256
    for _ in range(5):
        x = random_logits(rng, n, v)
        x[1] = np.round(x[1])  # many ties, including at the max
        x[2, [5, 9, 200]] = x[2].max() + 1  # explicit tie
        reqs = [SampleRequest(SamplingParams(temperature=0), [1], [], make_rng(SamplingParams()))
                for _ in range(n)]
        out = sampler(ms.Tensor(x), reqs, -1)
        assert out.token_ids.dtype == np.int64 and out.logprobs is None
        np.testing.assert_array_equal(out.token_ids, np.argmax(x, axis=-1))
        assert out.token_ids[2] == 5
    # greedy rows in the generic graph (batched with a sampled row) break ties the same way
    x = np.round(random_logits(rng, n, v))
    params = [SamplingParams(temperature=0)] * (n - 1) + [SamplingParams(temperature=1.0, top_p=0.5)]
    reqs = [SampleRequest(p, [1], [], np.random.default_rng(i)) for i, p in enumerate(params)]
    got = sampler(ms.Tensor(x), reqs, -1).token_ids
    np.testing.assert_array_equal(got[:-1], np.argmax(x[:-1], axis=-1))


def test_argmax_from_the_step_graph_only_for_plain_greedy(sampler):
    """The runner hands over the step graph's arg-max; the sampler may use it only where the
    answer is the raw arg-max (all greedy, no penalties or bans), else it must process the logits."""
    rng = np.random.default_rng(7)
    x = random_logits(rng, 2, 300)
    wrong = ms.Tensor(np.array([3, 4], np.int32))  # not the arg-max of either row
    plain = [SampleRequest(SamplingParams(temperature=0), [1], [], np.random.default_rng(0))] * 2
    assert sampler(ms.Tensor(x), plain, -1, wrong).token_ids.tolist() == [3, 4]
    penalised = [SampleRequest(SamplingParams(temperature=0, repetition_penalty=1.3), [1], [], np.random.default_rng(0))] * 2
    want = [int(np.argmax(ref_process(x[i], penalised[i].params, [1], []))) for i in range(2)]
    assert sampler(ms.Tensor(x), penalised, -1, wrong).token_ids.tolist() == want


# ---------------------------------------------------------------------------------------------
# each filter against the reference, same u


FILTER_CASES = {
    "temperature": [SamplingParams(temperature=t) for t in (0.3, 0.7, 1.0, 1.5)],
    "top_k": [SamplingParams(temperature=1.0, top_k=k) for k in (1, 2, 10, 100)],
    "top_p": [SamplingParams(temperature=t, top_p=q) for t, q in ((1.0, 0.1), (0.8, 0.5), (1.0, 0.9), (1.3, 0.99))],
    "min_p": [SamplingParams(temperature=t, min_p=m) for t, m in ((1.0, 0.05), (0.7, 0.2), (1.0, 0.5), (2.0, 0.01))],
    "top_k_top_p_min_p": [SamplingParams(temperature=0.9, top_k=50, top_p=0.8, min_p=0.02),
                          SamplingParams(temperature=1.2, top_k=5, top_p=0.6),
                          SamplingParams(temperature=0.6, top_p=0.95, min_p=0.1),
                          SamplingParams(temperature=1.0, top_k=200, min_p=0.001)],
}


@pytest.mark.parametrize("case", sorted(FILTER_CASES))
def test_filter_matches_reference(sampler, case):
    rng = np.random.default_rng(sorted(FILTER_CASES).index(case))
    n, v = 8, 256
    params = FILTER_CASES[case] * 2  # 8 rows, 4 distinct parameter sets
    n_amb = 0
    for it in range(25):
        x = random_logits(rng, n, v, scale=float(rng.choice([1.0, 3.0])))
        n_amb += check_batch(sampler, x, params, [[1, 2]] * n, [[]] * n, [1000 * it + i for i in range(n)])
    assert n_amb <= 5


PENALTY_CASES = [
    SamplingParams(temperature=1.0, repetition_penalty=1.5),
    SamplingParams(temperature=0.8, repetition_penalty=0.7),
    SamplingParams(temperature=1.0, frequency_penalty=0.8),
    SamplingParams(temperature=1.0, presence_penalty=-1.5),
    SamplingParams(temperature=0.7, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5, top_p=0.9),
    SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=2.0),
    SamplingParams(temperature=1.0, min_tokens=4, max_tokens=8),
    SamplingParams(temperature=0, min_tokens=4, max_tokens=8, stop_token_ids=[11, 12]),
]


def test_penalties_and_min_tokens_match_reference(sampler):
    rng = np.random.default_rng(7)
    n, v = 8, 256
    n_amb = 0
    for it in range(25):
        x = random_logits(rng, n, v)
        # make the penalised / banned tokens the likely ones so the penalties matter
        hot = rng.choice(v, 12, replace=False)
        x[:, hot] += 4.0
        x[:, EOS + [11, 12]] += 6.0
        prompts = [[int(t) for t in rng.choice(hot, 5)] for _ in range(n)]
        outputs = [[int(t) for t in rng.choice(hot, int(rng.integers(0, 7)))] for _ in range(n)]
        n_amb += check_batch(sampler, x, PENALTY_CASES, prompts, outputs, [77 * it + i for i in range(n)])
    assert n_amb <= 5


def test_min_tokens_bans_eos_and_stop_ids(sampler):
    v = 64
    x = np.zeros((4, v), np.float32)
    x[:, 3] = 10.0  # EOS wins when allowed
    x[:, 11] = 9.0  # stop token id next
    x[:, 20] = 8.0
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[11]),
              SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[11]),
              SamplingParams(temperature=0, min_tokens=2, ignore_eos=True, stop_token_ids=[11]),
              SamplingParams(temperature=0, min_tokens=1)]
    outputs = [[], [5, 6], [5], [1]]
    reqs = [SampleRequest(p, [0], o, make_rng(p)) for p, o in zip(params, outputs)]
    got = sampler(ms.Tensor(x), reqs, -1).token_ids
    # banned both / min_tokens reached / ignore_eos: EOS still banned (vLLM) / reached
    np.testing.assert_array_equal(got, [20, 3, 20, 3])


def test_mixed_batch_and_ties(sampler):
    """Different parameters in one batch, integer logits with many ties at the thresholds."""
    rng = np.random.default_rng(11)
    n, v = 8, 96
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=3),
              SamplingParams(temperature=0.5, top_p=0.7), SamplingParams(temperature=1.0, min_p=0.3),
              SamplingParams(temperature=1.0, top_k=10, top_p=0.9, repetition_penalty=1.3),
              SamplingParams(temperature=2.0), SamplingParams(temperature=0, presence_penalty=1.0),
              SamplingParams(temperature=0.9, top_k=4, min_tokens=3, max_tokens=5)]
    n_amb = 0
    for it in range(30):
        x = np.round(random_logits(rng, n, v, scale=2.0))  # values in a few integers: ties everywhere
        prompts = [[int(t) for t in rng.integers(0, v, 4)] for _ in range(n)]
        outputs = [[int(t) for t in rng.integers(0, v, 2)] for _ in range(n)]
        n_amb += check_batch(sampler, x, params, prompts, outputs, [31 * it + i for i in range(n)])
    assert n_amb <= 8


def test_candidate_fallback(sampler, monkeypatch):
    """With tiny candidate lists the top_p cut-off / top_k ties fall past K: the re-runs must
    still give the reference's tokens."""
    monkeypatch.setattr(sampler_mod, "CANDIDATE_K", (4, 16))
    rng = np.random.default_rng(5)
    n, v = 8, 96
    params = [SamplingParams(temperature=1.0, top_p=0.95), SamplingParams(temperature=1.0, top_k=3),
              SamplingParams(temperature=1.0, top_k=12, top_p=0.99), SamplingParams(temperature=3.0, top_p=0.5),
              SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=40),
              SamplingParams(temperature=1.0, top_p=0.3), SamplingParams(temperature=0.5, top_k=2, top_p=0.9)]
    n_amb = 0
    for it in range(20):
        x = random_logits(rng, n, v, scale=0.5)  # flat: top_p cut-offs far down the list
        if it % 2:
            x = np.round(x * 4)  # ties across the K boundary
        n_amb += check_batch(sampler, x, params, [[0]] * n, [[]] * n, [13 * it + i for i in range(n)])
    assert n_amb <= 5


# ---------------------------------------------------------------------------------------------
# logprobs


def test_topk_logprobs_match_numpy():
    rng = np.random.default_rng(3)
    n, v = 8, 300
    x = random_logits(rng, n, v, scale=4.0)
    want = ref_log_softmax(x)
    chosen = rng.integers(0, v, n)
    for k in (0, 1, 3, 5, 7, 20):
        lp, ids, top = topk_logprobs(ms.Tensor(x), k, chosen)
        assert ids.shape == (n, k) and top.shape == (n, k)
        np.testing.assert_allclose(lp, want[np.arange(n), chosen], atol=1e-5, rtol=0)
        ref_ids = np.argsort(-want, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(top, np.take_along_axis(want, ref_ids, 1), atol=1e-5, rtol=0)
    none, ids, top = topk_logprobs(ms.Tensor(x), 5, None)  # prompt-logprob style, no chosen ids
    assert none is None and ids.shape == (n, 5)


def test_topk_logprobs_ties_deterministic():
    v = 64
    x = np.zeros((4, v), np.float32)
    x[:, [10, 3, 40]] = 2.0
    x[2] = x[0]
    _, ids_a, top_a = topk_logprobs(ms.Tensor(x), 5, None)
    _, ids_b, _ = topk_logprobs(ms.Tensor(x[[2, 1, 0, 3]]), 5, None)
    np.testing.assert_array_equal(ids_a[:3, :3], [[3, 10, 40]] * 3)  # best first, ties by id
    np.testing.assert_array_equal(ids_a[0], ids_a[2])  # same row, same answer
    np.testing.assert_array_equal(ids_a[0], ids_b[0])  # whatever the row's position
    np.testing.assert_allclose(top_a[0], np.sort(ref_log_softmax(x[0]))[::-1][:5], atol=1e-5)


def test_sampler_logprobs_are_raw(sampler):
    rng = np.random.default_rng(4)
    n, v = 8, 256
    x = random_logits(rng, n, v)
    params = [SamplingParams(temperature=0.5, top_k=5, repetition_penalty=1.5, logprobs=3)] * 4 + \
             [SamplingParams(temperature=0, logprobs=0)] * 4
    reqs = [SampleRequest(p, [1, 2, 3], [4], np.random.default_rng(i)) for i, p in enumerate(params)]
    out = sampler(ms.Tensor(x), reqs, 3)
    want = ref_log_softmax(x)
    np.testing.assert_allclose(out.logprobs, want[np.arange(n), out.token_ids], atol=1e-5, rtol=0)
    ref_ids = np.argsort(-want, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(out.top_ids, ref_ids)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(want, ref_ids, 1), atol=1e-5, rtol=0)
    # all-greedy batch (argmax path) with logprobs=0: only the sampled token's logprob
    reqs = [SampleRequest(SamplingParams(temperature=0, logprobs=0), [1], [], make_rng(SamplingParams()))] * n
    out = sampler(ms.Tensor(x), reqs, 0)
    np.testing.assert_array_equal(out.token_ids, x.argmax(-1))
    np.testing.assert_allclose(out.logprobs, want.max(-1), atol=1e-5, rtol=0)
    assert out.top_ids.shape == (n, 0)


# ---------------------------------------------------------------------------------------------
# seeds, validation, statistics


def test_seeded_request_independent_of_batch(sampler):
    v = 256
    rng = np.random.default_rng(9)
    steps = [random_logits(rng, 8, v, scale=1.0) for _ in range(6)]
    mine = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=8)

    def run(batch_params):
        reqs = [SampleRequest(p, [1, 2], [], make_rng(p)) for p in batch_params]
        seq = []
        for x in steps:
            out = sampler(ms.Tensor(x[:len(batch_params)] if len(batch_params) > 1 else x[:1]), reqs, -1)
            for r, t in zip(reqs, out.token_ids):
                r.output_ids.append(int(t))
            seq.append(int(out.token_ids[0]))
        return seq

    alone = run([mine])
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=2, frequency_penalty=1.0),
              SamplingParams(temperature=0.5, min_p=0.2, min_tokens=3), SamplingParams(temperature=1.3, seed=7)]
    batched = run([mine] + others)
    again = run([mine] + others[::-1])
    assert alone == batched == again
    # and it is the reference's sequence
    g = np.random.default_rng(1234)
    out_ids: list[int] = []
    for x in steps:
        tok, _ = ref_sample(ref_process(x[0], mine, [1, 2], out_ids), mine, float(g.random()))
        out_ids.append(tok)
    assert out_ids == alone


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2),
                                    dict(min_p=1.5), dict(min_p=-0.1), dict(repetition_penalty=0.0),
                                    dict(presence_penalty=3.0), dict(frequency_penalty=-2.5),
                                    dict(min_tokens=20, max_tokens=10), dict(logprobs=21), dict(max_tokens=0)])
def test_invalid_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_statistics_small_distribution(sampler):
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005])
    v, n, calls = probs.size, 64, 60
    x = np.tile(np.log(probs).astype(np.float32), (n, 1))
    reqs = [SampleRequest(SamplingParams(temperature=1.0), [0], [], np.random.default_rng(100 + i)) for i in range(n)]
    counts = np.zeros(v)
    t = ms.Tensor(x)
    for _ in range(calls):
        counts += np.bincount(sampler(t, reqs, -1).token_ids, minlength=v)
    total = n * calls
    chi2 = (((counts - total * probs) ** 2) / (total * probs)).sum()
    assert chi2 < 30.0, (chi2, counts / total)  # df = 7: P(chi2 > 30) ~ 1e-4
    # top_k=2 renormalises to (0.4, 0.25) / 0.65
    reqs = [SampleRequest(SamplingParams(temperature=1.0, top_k=2), [0], [], np.random.default_rng(500 + i))
            for i in range(n)]
    c2 = np.zeros(v)
    for _ in range(20):
        c2 += np.bincount(sampler(t, reqs, -1).token_ids, minlength=v)
    assert c2[2:].sum() == 0
    assert abs(c2[0] / c2.sum() - 0.4 / 0.65) < 0.03


def test_large_vocab_matches_reference(sampler, monkeypatch):
    """One V=49152 batch: candidate lists, the K fallback (an almost flat row) and logprobs."""
    used = []
    real = sampler_mod._generic_fn

    def spy(mods, cand_k, vocab):
        used.append(cand_k)
        return real(mods, cand_k, vocab)

    monkeypatch.setattr(sampler_mod, "_generic_fn", spy)
    rng = np.random.default_rng(21)
    n, v = 4, 49152
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50), SamplingParams(temperature=1.0, top_p=0.95),
              SamplingParams(temperature=1.0, top_k=2000, min_p=0.001), SamplingParams(temperature=0)]
    x = random_logits(rng, n, v, scale=4.0)
    assert check_batch(sampler, x, params, [[1, 2]] * n, [[]] * n, [1, 2, 3, 4]) <= 1
    assert used == [8192]  # top_k=2000 needs the 8192 list, and the top_p cut-offs are inside it
    # Almost flat row 1: its top_p cut-off (~45k tokens down) is past every candidate list, so
    # the batch is re-run up to the exact full sort. Token masses are ~2e-5 there, below fp32's
    # resolution of a 49k-long cumulative sum, so row 1 is checked to a tolerance.
    used.clear()
    x[1] *= 0.05
    reqs = [SampleRequest(p, [1, 2], [], np.random.default_rng(10 + i)) for i, p in enumerate(params)]
    got = sampler(ms.Tensor(x), reqs, 5)
    assert used == [8192, v]
    for i in (0, 2, 3):
        want, amb = ref_sample(x[i].astype(np.float64), params[i], first_u(10 + i))
        assert amb or got.token_ids[i] == want
    u = first_u(11)
    _, _, cdf = ref_sample(x[1].astype(np.float64), params[1], u, details=True)
    t = int(got.token_ids[1])
    lo = cdf[t - 1] if t else 0.0
    assert lo - 1e-3 <= u <= cdf[t] + 1e-3 and cdf[t] > lo - 1e-3
    want = ref_log_softmax(x)
    np.testing.assert_allclose(got.logprobs, want[np.arange(n), got.token_ids], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got.top_ids, np.argsort(-want, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(got.top_logprobs, np.take_along_axis(want, got.top_ids, 1), atol=1e-5, rtol=0)
