"""Speculative decoding (n-gram drafts verified in the batching engine) is lossless: greedy
outputs equal the non-speculative engine's token for token, batched, chunked, under preemption
and aborts; sampled outputs follow the target's distribution (chi-square)."""
from __future__ import annotations


import numpy as np
import pytest

from tests.engine_probe import all_free, run_with_random_aborts, tokens
from tests.tiny import make_tiny_model, tiny_llm

# Mixed lengths; repeated spans give the n-gram proposer matches (some accepted, some not).
PROMPTS = [[256] + list(range(3 + i, 3 + i + n)) * 2 for i, n in enumerate([3, 17, 9, 30, 1, 12, 5, 2])]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_spec")))


def _llm(path, **kw):
    return tiny_llm(path, **{"max_model_len": 128, **kw})


def _greedy(max_tokens=24, **kw):
    from mindcpm import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Greedy outputs of the non-speculative engine, one request at a time."""
    llm = _llm(tiny_dir, max_num_seqs=1)
    return [tokens(llm.generate({"prompt_token_ids": p}, _greedy()))[0] for p in PROMPTS]


@pytest.mark.parametrize("kw", [dict(max_num_seqs=8),
                                dict(max_num_seqs=4, max_num_batched_tokens=16),
                                dict(max_num_seqs=8, kv_cache_gib=1e-9)],  # 16 blocks of 8: preemption
                         ids=["batched", "chunked", "tiny-pool"])
def test_ngram_greedy_equals_non_speculative(tiny_dir, reference, kw):
    llm = _llm(tiny_dir, speculative_config=NGRAM, **kw)
    assert tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy())) == reference
    stats = llm.engine.spec_stats
    assert stats.num_accepted_tokens > 0 and stats.num_accepted_tokens < stats.num_draft_tokens
    assert all_free(llm)


def test_tiny_pool_preempts(tiny_dir):
    llm = _llm(tiny_dir, speculative_config=NGRAM, max_num_seqs=8, kv_cache_gib=1e-9)
    preempted = []
    scheduler = llm.engine.scheduler
    original = scheduler._preempt
    scheduler._preempt = lambda seq: (preempted.append(seq.seq_id), original(seq))
    llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy())
    assert preempted and all_free(llm)


def test_mixed_speculating_and_not_with_random_aborts(tiny_dir, reference):
    """Requests with a penalty or logprobs never speculate; the others do in the same batches.
    Random aborts leave every block free."""
    llm = _llm(tiny_dir, speculative_config=NGRAM, max_num_seqs=8)
    engine = llm.engine
    params = [_greedy(logprobs=1) if i % 3 == 0 else _greedy() for i in range(len(PROMPTS))]
    states = [engine.add_request(p, q) for p, q in zip(PROMPTS, params)]
    while any(not s.finished for s in states):
        engine.step()
    assert [s.seq.completion_token_ids for s in states] == reference
    assert all(len(s.seq.logprobs) == 24 for s, q in zip(states, params) if q.logprobs is not None)

    states = run_with_random_aborts(engine, PROMPTS, _greedy(), 0.15)
    kept = [s for s in states if s.seq.finish_reason == "length"]
    assert [s.seq.completion_token_ids for s in kept] == [reference[states.index(s)] for s in kept]
    assert all_free(llm)


def test_stops_inside_an_accepted_run(tiny_dir, reference):
    """EOS-like stop tokens, max_tokens and stop strings end the output exactly where the
    non-speculative engine ends it, even when the stop lands inside an accepted draft run."""
    from mindcpm import SamplingParams
    base = _llm(tiny_dir)
    spec = _llm(tiny_dir, speculative_config=NGRAM)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    for i, ref in enumerate(reference):
        stop_id = ref[len(ref) // 2]
        for params in (_greedy(stop_token_ids=[stop_id]), _greedy(max_tokens=7 + i)):
            want = base.generate(prompts[i], params)[0].outputs[0]
            got = spec.generate(prompts[i], params)[0].outputs[0]
            assert (got.token_ids, got.finish_reason, got.stop_reason) == \
                (want.token_ids, want.finish_reason, want.stop_reason)
    text = base.generate(prompts[3], _greedy())[0].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
    want, got = (llm.generate(prompts[3], params)[0].outputs[0] for llm in (base, spec))
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
    assert all_free(spec)


def test_steady_state_compiles_nothing_new(tiny_dir):
    """Verify steps are exactly 1 + k tokens wide: the same workload again compiles nothing (no
    prefix cache, so the second run schedules the same steps)."""
    llm = _llm(tiny_dir, speculative_config=NGRAM, max_num_seqs=8, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    llm.generate(prompts, _greedy())
    shapes = set(llm.engine.runner.compiled_shapes)
    assert any(key[0][1] == 1 + NGRAM["num_speculative_tokens"] for key in shapes)  # input_ids [rows, width]
    llm.generate(prompts, _greedy())
    assert set(llm.engine.runner.compiled_shapes) == shapes


def test_ngram_proposer_matches_prompt_lookup():
    from mindcpm.engine.spec_decode import NgramProposer, SpeculativeConfig
    cfg = SpeculativeConfig("ngram", 3, prompt_lookup_max=3, prompt_lookup_min=2)
    proposer = NgramProposer(cfg)
    # The suffix [1, 2, 3] occurred at 0: propose what followed it.
    assert proposer.propose([1, 2, 3, 4, 5, 6, 1, 2, 3], 10) == [4, 5, 6]
    # The longest suffix wins over a shorter, earlier one: [5, 2, 3] at 4, not [2, 3] at 1.
    assert proposer.propose([9, 2, 3, 7, 5, 2, 3, 8, 5, 2, 3], 10) == [8, 5, 2]
    assert proposer.propose([1, 2, 3, 4, 5, 6, 1, 2, 3], 2) == [4, 5]  # capped by the caller
    assert proposer.propose([1, 2, 3, 4], 10) == []  # no earlier occurrence of >= 2 tokens
    assert proposer.propose([7, 7, 7], 10) == [7]  # only one token follows the match


@pytest.mark.parametrize("config, message", [
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "unknown speculative method 'medusa'"),
    ({"method": "ngram"}, "needs 'method' and 'num_speculative_tokens'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "prompt_lookup_min <= prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft": 1}, "unknown speculative_config key 'draft'"),
])
def test_bad_speculative_config(config, message):
    from mindcpm.engine.spec_decode import SpeculativeConfig
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_dict(config)


class _FixedDrafts:
    """A proposer that drafts what the test says for each context (a point mass, like n-gram)."""

    def __init__(self, drafts: dict[tuple, list[int]]):
        self.drafts = drafts

    def propose(self, token_ids, limit):
        return self.drafts.get(tuple(token_ids), [])[:limit]


def _drafts_from(llm, candidates: dict[tuple, list[int]], q: np.ndarray) -> None:
    """After the EAGLE drafter's chain (whose own drafts must be samples of the head's top-2
    distribution), each draft is replaced by a sample of q over the test's two candidate tokens of
    its context, with q recorded as the draft's distribution."""
    drafter, vocab = llm.engine.proposer, llm.engine.runner.model_cfg.vocab_size
    extend = drafter.extend

    def replace(batch):
        extend(batch)
        for seq in batch.seqs:
            if not seq.spec_token_ids:
                continue
            assert len(seq.spec_probs) == len(seq.spec_token_ids)
            for d, head_q in zip(seq.spec_token_ids, seq.spec_probs):
                assert head_q[d] > 0 and (head_q > 0).sum() <= 2 and abs(head_q.sum() - 1) < 1e-9
            seq.spec_probs = []
            for j in range(len(seq.spec_token_ids)):
                dist = np.zeros(vocab)
                dist[candidates[tuple(seq.token_ids + seq.spec_token_ids[:j])]] = q
                seq.spec_token_ids[j] = int(seq.rng.choice(vocab, p=dist))
                seq.spec_probs.append(dist)

    drafter.extend = replace


@pytest.mark.parametrize("drafter", ["fixed", "overlapping-q"])
def test_sampled_output_follows_the_target_distribution(tiny_dir, tmp_path, drafter):
    """temperature 1, top_k 2: the joint distribution of three tokens (t1 from the prefill, t2 and
    t3 from a verify step whose drafts are accepted or rejected) equals the target's
    p(t1) p(t2|t1) p(t3|t1,t2), computed in numpy from the model's logits (chi-square). Drafts:
    fixed point masses (accept_chain); or, after an EAGLE head drafted from its own q, samples of
    a q that overlaps the target's top two (rejection_sample: accepted, rejected and resampled from
    the residual, bonus tokens; a random head's drafts mostly miss the target's top two)."""
    from scipy.stats import chisquare

    from mindcpm import SamplingParams
    from tests.engine_probe import prefill_logits
    from tests.models.test_eagle import make_draft
    config = NGRAM
    if drafter != "fixed":
        make_draft(str(tmp_path), own_vocab=False)
        config = {"method": "eagle", "model": str(tmp_path), "num_speculative_tokens": 2}
    llm = _llm(tiny_dir, max_num_seqs=16, speculative_config=config)
    prompt = PROMPTS[2]

    def top2(ctx):
        logits = prefill_logits(llm, [ctx])[0][-1].astype(np.float64)
        ids = np.argsort(-logits, kind="stable")[:2]
        p = np.exp(logits[ids] - logits[ids].max())
        return ids.tolist(), p / p.sum()

    expected, drafts, candidates = {}, {}, {}
    ids1, p1 = top2(prompt)
    for t1, q1 in zip(ids1, p1):
        ids2, p2 = top2(prompt + [t1])
        candidates[tuple(prompt + [t1])] = ids2
        # Draft the likelier t2 and, after it, t3's less likely token: both outcomes occur.
        drafts[tuple(prompt + [t1])] = [ids2[0], top2(prompt + [t1, ids2[0]])[0][1]]
        for t2, q2 in zip(ids2, p2):
            ids3, p3 = top2(prompt + [t1, t2])
            for t3, q3 in zip(ids3, p3):
                expected[(t1, t2, t3)] = q1 * q2 * q3
    if drafter == "fixed":
        llm.engine.proposer = _FixedDrafts(drafts)
    if drafter == "overlapping-q":
        _drafts_from(llm, candidates, np.array([0.25, 0.75]))  # favours the target's less likely token
    n = 640
    params = [SamplingParams(temperature=1.0, top_k=2, max_tokens=3, ignore_eos=True, seed=s) for s in range(n)]
    outs = llm.generate([{"prompt_token_ids": prompt}] * n, params)
    counts = {}
    for o in outs:
        key = tuple(o.outputs[0].token_ids)
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(expected)
    cells = sorted(expected)
    stat = chisquare([counts.get(c, 0) for c in cells], [expected[c] * n for c in cells])
    assert stat.pvalue > 1e-3, (stat, counts, expected)
    stats = llm.engine.spec_stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens

    # Per-request seeds: the same seeds give the same outputs, whatever the batch.
    again = llm.generate([{"prompt_token_ids": prompt}] * 5, params[-5:])
    assert tokens(again) == tokens(outs[-5:])


def test_drafting_backs_off_after_rejected_chains():
    """After chains rejected outright a sequence drafts on 1 step in 2, 3, 5, 9, ... (at most one
    verify step per MAX_DRAFT_BACKOFF + 1); one accepted draft resets it."""
    from mindcpm import SamplingParams
    from mindcpm.engine.sequence import Sequence
    from mindcpm.engine.spec_decode import MAX_DRAFT_BACKOFF, record_outcome, wants_draft
    seq = Sequence([1, 2, 3], SamplingParams(), 8)
    drafted = []
    for _ in range(200):
        drafted.append(wants_draft(seq))
        if drafted[-1]:
            record_outcome(seq, 0)
    steps = [i for i, d in enumerate(drafted) if d]
    assert steps[:6] == [0, 2, 5, 10, 19, 36]
    assert all(b - a == MAX_DRAFT_BACKOFF + 1 for a, b in zip(steps[6:], steps[7:]))
    record_outcome(seq, 2)
    seq.spec_skip_steps = 0
    assert wants_draft(seq) and wants_draft(seq)


def test_rejection_sampler_output_follows_the_target():
    """The sampler alone, over many seeds: drafts drawn from q (not a point mass, overlapping p
    partly) and verified against p give, per position, the target's distribution; a position the
    chain did not reach is sampled from the target as the engine's next step would. Joint of
    three positions, chi-square, plus both outcomes observed."""
    from scipy.stats import chisquare

    from mindcpm.engine.spec_decode import rejection_sample
    p = np.array([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.4, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = np.array([[0.2, 0.2, 0.2, 0.4], [0.7, 0.1, 0.1, 0.1]])
    counts, accepted, n = np.zeros((4, 4, 4)), 0, 8000
    for seed in range(n):
        rng = np.random.default_rng(seed)
        drafts = [int(rng.choice(4, p=q[j])) for j in range(2)]
        out = rejection_sample(p, q, drafts, rng)
        accepted += len(out) - 1
        while len(out) < 3:  # the next step samples the target itself
            out.append(int(rng.choice(4, p=p[len(out)])))
        counts[tuple(out[:3])] += 1
    expected = np.einsum("a,b,c->abc", p[0], p[1], p[2]) * n
    nonzero = expected > 0
    assert counts[~nonzero].sum() == 0
    assert chisquare(counts[nonzero], expected[nonzero]).pvalue > 1e-3
    assert 0 < accepted < 2 * n
