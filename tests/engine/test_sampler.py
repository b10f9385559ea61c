"""Sampler against the distributions it must draw from, written from the semantics (vLLM's).

The reference (float64) gives, for one row of logits and its SamplingParams, the probability of
every token; the sampler is then run on many copies of the row, each with its own generator,
and the counts are checked: no token outside the kept set is ever drawn, and the frequencies
pass a chi-square goodness-of-fit test. Nothing here assumes HOW the sampler draws (the
implementation uses an inverse CDF; any exact method passes). Seeds are fixed, so a run is
deterministic; the p-value bound (1e-4) only says how unlikely a correct sampler is to fail on
some other seed.

Reference semantics:
  penalties: repetition (HF, prompt+output ids: x/r if x>0 else x*r), then -freq*count and
  -presence*[count>0] over output ids; then min_tokens: while len(output) < min_tokens the
  stop_token_ids and the EOS ids are -inf (also with ignore_eos, as in vLLM).
  temperature 0: argmax, ties -> lowest id.  Else z = x/T, p = softmax(z);
  top_k keeps z >= k-th largest z; top_p (on the top_k-renormalised p) keeps a token iff the mass
  of strictly more likely tokens is < top_p; min_p keeps p >= min_p * max p; the kept p,
  renormalised, is the distribution.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import mindspore as ms

from mindcpm.engine import sampler as sampler_mod
from mindcpm.engine.sampler import Sampler, SampleRequest, make_rng, topk_logprobs
from mindcpm.sampling import SamplingParams

EOS = [3, 7]
MARGIN = 3e-6  # a keep/drop decision this close to its boundary may go either way in fp32
MIN_P_VALUE = 1e-4  # chi-square: a correct sampler fails this with probability 1e-4 per check


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


def ref_distribution(x, params: SamplingParams):
    """(q, ambiguous): the probability of every token id, and whether some keep/drop decision
    lies within MARGIN of its boundary."""
    v = x.shape[0]
    if params.temperature == 0:
        q = np.zeros(v)
        q[int(np.argmax(x))] = 1.0  # np.argmax: first maximal index
        return q, False
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
        keep &= z >= vals[above < params.top_p].min()
    if params.min_p > 0.0:
        ratio = p / p.max()
        amb |= bool(np.any(np.abs(ratio - params.min_p) < MARGIN))
        keep &= ratio >= params.min_p
    q = np.where(keep, p, 0.0)
    return q / q.sum(), amb


def ref_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def sampler():
    return Sampler(EOS)


def random_logits(rng, n, v, scale=3.0):
    return (rng.standard_normal((n, v)) * scale).astype(np.float32)


def draw_counts(sampler, logits, params_list, prompts, outputs, copies: int, calls: int, seed: int = 0):
    """counts [rows, V]: row i of `logits` with params_list[i] is put `copies` times into one
    batch, each copy with its own generator, and the batch is sampled `calls` times."""
    n, v = logits.shape
    x = ms.Tensor(np.repeat(logits.astype(np.float32), copies, axis=0))
    reqs = [SampleRequest(params_list[i], prompts[i], outputs[i], np.random.default_rng([seed, i, c]))
            for i in range(n) for c in range(copies)]
    counts = np.zeros((n, v), np.int64)
    for _ in range(calls):
        ids = sampler(x, reqs, -1).token_ids.reshape(n, copies)
        for i in range(n):
            np.add.at(counts[i], ids[i], 1)
    return counts


def assert_distribution(counts, q, what=""):
    """Never a token of probability 0; frequencies fit q (chi-square, rare tokens pooled)."""
    outside = np.flatnonzero((q == 0) & (counts > 0))
    assert not len(outside), f"{what}: drew tokens outside the kept set: {outside[:10]} ({counts[outside][:10]})"
    total = counts.sum()
    expected = q * total
    common = expected >= 5
    obs, exp = counts[common], expected[common]
    rare = ~common & (q > 0)
    if expected[rare].sum() >= 1:
        obs, exp = np.append(obs, counts[rare].sum()), np.append(exp, expected[rare].sum())
    if len(obs) < 2:
        return  # one token holds (nearly) all the mass: the support check is the test
    p_value = stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
    assert p_value > MIN_P_VALUE, f"{what}: chi-square p = {p_value:.2e}"


def unambiguous_rows(rng, params_list, make_row, prompts, outputs):
    """One logits row per parameter set whose reference has no borderline decision (redrawn
    until so), and the reference distributions (after penalties)."""
    rows, qs = [], []
    for p, prompt, output in zip(params_list, prompts, outputs):
        while True:
            x = make_row(rng)
            q, amb = ref_distribution(ref_process(x, p, prompt, output), p)
            if not amb:
                break
        rows.append(x)
        qs.append(q)
    return np.stack(rows), qs


def check_sets(sampler, rng, params_list, make_row, prompts=None, outputs=None, copies=32, calls=40):
    """Every parameter set on its own row, all in one batch: each row's counts fit its reference."""
    n = len(params_list)
    prompts, outputs = prompts or [[1, 2]] * n, outputs or [[]] * n
    x, qs = unambiguous_rows(rng, params_list, make_row, prompts, outputs)
    counts = draw_counts(sampler, x, params_list, prompts, outputs, copies, calls)
    for i, p in enumerate(params_list):
        assert_distribution(counts[i], qs[i], repr(p))


def gaussian_row(v, scale):
    return lambda rng: random_logits(rng, 1, v, scale)[0]


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
# each filter, and all of them combined, against the reference distribution


FILTER_CASES = {
    "temperature": [SamplingParams(temperature=t) for t in (0.3, 0.7, 1.0, 1.5)],
    "top_k": [SamplingParams(temperature=1.0, top_k=k) for k in (1, 2, 10, 100)],
    "top_p": [SamplingParams(temperature=t, top_p=q) for t, q in ((1.0, 0.1), (0.8, 0.5), (1.0, 0.9), (1.3, 0.99))],
    "min_p": [SamplingParams(temperature=t, min_p=m) for t, m in ((1.0, 0.05), (0.7, 0.2), (1.0, 0.5), (2.0, 0.01))],
    "top_k_top_p_min_p": [SamplingParams(temperature=0.9, top_k=50, top_p=0.8, min_p=0.02),
                          SamplingParams(temperature=1.2, top_k=5, top_p=0.6),
                          SamplingParams(temperature=0.6, top_p=0.95, min_p=0.1),
                          SamplingParams(temperature=1.0, top_k=20, min_p=0.001)],
}


@pytest.mark.parametrize("case", sorted(FILTER_CASES))
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_filter_distribution(sampler, case, scale):
    rng = np.random.default_rng([sorted(FILTER_CASES).index(case), int(scale)])
    check_sets(sampler, rng, FILTER_CASES[case], gaussian_row(128, scale))


PENALTY_CASES = [
    SamplingParams(temperature=1.0, repetition_penalty=1.5),
    SamplingParams(temperature=0.8, repetition_penalty=0.7),
    SamplingParams(temperature=1.0, frequency_penalty=0.8),
    SamplingParams(temperature=1.0, presence_penalty=-1.5),
    SamplingParams(temperature=0.7, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5, top_p=0.9),
    SamplingParams(temperature=1.1, repetition_penalty=1.3, frequency_penalty=0.4, top_k=8, min_p=0.05),
    SamplingParams(temperature=1.0, min_tokens=4, max_tokens=8),
    SamplingParams(temperature=0, min_tokens=4, max_tokens=8, stop_token_ids=[11, 12]),
]


def test_penalties_and_min_tokens_distribution(sampler):
    rng = np.random.default_rng(7)
    v = 64
    hot = rng.choice(np.setdiff1d(np.arange(v), EOS + [11, 12]), 12, replace=False)

    def row(rng):
        # the penalised / banned tokens are the likely ones, so the penalties matter
        x = random_logits(rng, 1, v, 2.0)[0]
        x[hot] += 4.0
        x[EOS + [11, 12]] += 6.0
        return x

    n = len(PENALTY_CASES)
    prompts = [[int(t) for t in rng.choice(hot, 5)] for _ in range(n)]
    outputs = [[int(t) for t in rng.choice(hot, int(rng.integers(1, 7)))] for _ in range(n)]
    check_sets(sampler, rng, PENALTY_CASES, row, prompts, outputs)


def test_ties_at_every_threshold(sampler):
    """Integer logits: many tokens equal to the k-th value, the top_p edge and the min_p edge
    (all kept); different parameters side by side in one batch."""
    rng = np.random.default_rng(11)
    params = [SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=0.5, top_p=0.7),
              SamplingParams(temperature=1.0, min_p=0.3),
              SamplingParams(temperature=1.0, top_k=10, top_p=0.9, repetition_penalty=1.3),
              SamplingParams(temperature=2.0), SamplingParams(temperature=0, presence_penalty=1.0),
              SamplingParams(temperature=0.9, top_k=4, min_tokens=3, max_tokens=5)]
    n = len(params)
    prompts = [[int(t) for t in rng.integers(0, 96, 4)] for _ in range(n)]
    outputs = [[int(t) for t in rng.integers(0, 96, 2)] for _ in range(n)]
    check_sets(sampler, rng, params, lambda rng: np.round(random_logits(rng, 1, 96, 1.5)[0]), prompts, outputs)


def test_candidate_fallback_distribution(sampler, monkeypatch):
    """With tiny candidate lists the top_p cut-off / top_k ties fall past K: the re-runs must
    still draw from the reference distribution."""
    monkeypatch.setattr(sampler_mod, "CANDIDATE_K", (4, 16))
    rng = np.random.default_rng(5)
    params = [SamplingParams(temperature=1.0, top_p=0.95), SamplingParams(temperature=1.0, top_k=3),
              SamplingParams(temperature=1.0, top_k=12, top_p=0.99), SamplingParams(temperature=3.0, top_p=0.5),
              SamplingParams(temperature=1.0, top_k=40), SamplingParams(temperature=0.5, top_k=2, top_p=0.9)]
    check_sets(sampler, rng, params, gaussian_row(96, 0.5))  # flat: top_p cut-offs far down the list
    check_sets(sampler, rng, params, lambda rng: np.round(random_logits(rng, 1, 96, 2.0)[0]))  # ties past K


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
# seeds, validation, large vocabularies


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
    for x, tok in zip(steps, alone):  # and every token is one the reference may draw
        assert ref_distribution(x[0].astype(np.float64), mine)[0][tok] > 0


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2),
                                    dict(min_p=1.5), dict(min_p=-0.1), dict(repetition_penalty=0.0),
                                    dict(presence_penalty=3.0), dict(frequency_penalty=-2.5),
                                    dict(min_tokens=20, max_tokens=10), dict(logprobs=21), dict(max_tokens=0)])
def test_invalid_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_large_vocab_distribution(sampler, monkeypatch):
    """V=49152: candidate lists, the K fallback up to the exact full sort, and logprobs."""
    used = []
    real = sampler_mod._generic_fn

    def spy(mods, cand_k, vocab):
        used.append(cand_k)
        return real(mods, cand_k, vocab)

    monkeypatch.setattr(sampler_mod, "_generic_fn", spy)
    rng = np.random.default_rng(21)
    v = 49152
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=1.0, top_k=2000, min_p=0.01), SamplingParams(temperature=0)]
    n = len(params)
    x, qs = unambiguous_rows(rng, params, gaussian_row(v, 4.0), [[]] * n, [[]] * n)
    counts = draw_counts(sampler, x, params, [[1, 2]] * n, [[]] * n, copies=8, calls=30)
    assert set(used) == {8192}  # top_k=2000 needs the 8192 list, and the top_p cut-offs are inside it
    for i, p in enumerate(params):
        assert_distribution(counts[i], qs[i], repr(p))
    # An almost flat row: its top_p cut-off (~45k tokens down) is past every candidate list, so
    # the batch is re-run up to the exact full sort. Token masses (~2e-5) are below fp32's
    # resolution of a 49k-long cumulative sum, so only the kept set is checked exactly.
    used.clear()
    flat = SamplingParams(temperature=1.0, top_p=0.95)
    x[1] *= 0.05
    q, _ = ref_distribution(x[1].astype(np.float64), flat)
    counts = draw_counts(sampler, x[:2], [params[0], flat], [[1, 2]] * 2, [[]] * 2, copies=8, calls=3)
    assert used[-1] == v
    assert counts[1].sum() == 24 and not counts[1][q == 0].any()
    reqs = [SampleRequest(p, [1, 2], [], np.random.default_rng(10 + i)) for i, p in enumerate(params)]
    got = sampler(ms.Tensor(x), reqs, 5)
    want = ref_log_softmax(x)
    np.testing.assert_allclose(got.logprobs, want[np.arange(n), got.token_ids], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got.top_ids, np.argsort(-want, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(got.top_logprobs, np.take_along_axis(want, got.top_ids, 1), atol=1e-5, rtol=0)
