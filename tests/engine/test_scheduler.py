"""The scheduler against a fake paged model and an invariant checker.

The fake model's next token is a function of the whole token history, and it keeps a fake KV
cache keyed by (block, offset): every step writes the K/V of the tokens it is asked to compute
and reads back the K/V of every earlier position, checking each slot holds exactly that
position's prefix. So the scheduler must compute exactly the right positions into the right
blocks.

The checker (Invariants) watches every step of the engine loop and asserts what must hold
whatever the scheduling policy: every request's tokens are produced once each, in order, from
its own history; blocks are conserved; status transitions are legal (a preempted sequence
holds nothing and restarts from token 0); no request is starved (first admissions follow
arrival order and every request finishes); a finished request stopped for a reason its
parameters allow, at the first token that allowed it.
"""
import random

import pytest

from mindcpm.engine.scheduler import Scheduler
from mindcpm.engine.sequence import Sequence, SequenceStatus
from mindcpm.sampling import SamplingParams

VOCAB_SIZE = 101
EOS = 7
WAITING, RUNNING, FINISHED = SequenceStatus.WAITING, SequenceStatus.RUNNING, SequenceStatus.FINISHED
LEGAL = {(WAITING, WAITING), (WAITING, RUNNING), (RUNNING, RUNNING), (RUNNING, WAITING),
         (WAITING, FINISHED), (RUNNING, FINISHED), (FINISHED, FINISHED)}


def next_token(token_ids):
    return (sum(token_ids) * 31 + len(token_ids)) % VOCAB_SIZE


def prefix_keys(token_ids):
    """One key per position naming the exact prefix that position's K/V depends on."""
    keys, chained = [], 0
    for position, token in enumerate(token_ids):
        chained = hash((chained, token))
        keys.append((position, token, chained))
    return keys


class FakeModel:
    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.kv: dict[tuple[int, int], tuple] = {}
        self.first_prefill_hits: dict[int, int] = {}  # seq id -> tokens served by the prefix cache
        self.partial_chunks = 0

    def step(self, batch):
        self._check_batch(batch)
        block_size = self.scheduler.block_size
        blocks = self.scheduler.block_manager.blocks
        sampled = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + n
            assert 1 <= n and end <= seq.num_tokens
            assert len(seq.block_table) * block_size >= seq.num_tokens
            self._record_progress(seq, start, end)
            keys = prefix_keys(seq.token_ids[:end])
            for position in range(start, end):
                block_id = seq.block_table[position // block_size]
                assert blocks[block_id].ref_count == 1, "writing into a block another sequence shares"
                self.kv[block_id, position % block_size] = keys[position]
            for position in range(end):  # the attention of the last computed token
                slot = (seq.block_table[position // block_size], position % block_size)
                assert self.kv.get(slot) == keys[position], f"seq {seq.seq_id} read stale K/V at {position}"
            sampled.append(next_token(seq.token_ids) if end == seq.num_tokens else None)
        return sampled

    def _check_batch(self, batch):
        scheduler = self.scheduler
        assert batch.seqs and len(batch.seqs) == len(batch.num_new_tokens)
        assert len({seq.seq_id for seq in batch.seqs}) == len(batch.seqs)
        assert len(batch.seqs) <= scheduler.max_num_seqs
        assert sum(batch.num_new_tokens) <= scheduler.max_num_batched_tokens
        assert not any(seq.is_finished for seq in batch.seqs)
        if not batch.is_prefill:
            assert all(n == 1 and seq.num_cached_tokens == seq.num_tokens - 1
                       for seq, n in zip(batch.seqs, batch.num_new_tokens))

    def _record_progress(self, seq, start, end):
        self.first_prefill_hits.setdefault(seq.seq_id, start)
        if end < seq.num_tokens:
            self.partial_chunks += 1


def check_block_accounting(scheduler):
    manager = scheduler.block_manager
    holders = [seq for seq in (*scheduler.waiting, *scheduler.running) if seq.block_table]
    assert sum(block.ref_count for block in manager.blocks) == sum(len(s.block_table) for s in holders)
    in_use = sum(1 for block in manager.blocks if block.ref_count > 0)
    assert in_use + manager.num_free_blocks == manager.num_blocks
    # Only a partially prefilled sequence at the head of the queue holds blocks while waiting.
    assert all(seq is scheduler.waiting[0] for seq in scheduler.waiting if seq.block_table)


class Invariants:
    """Checks one engine loop step by step (see the module docstring)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.seqs: dict[int, Sequence] = {}
        self.status: dict[int, SequenceStatus] = {}
        self.samples: dict[int, list[tuple[int, int]]] = {}  # seq id -> (position, token) produced
        self.admitted: list[int] = []  # seq ids in the order of their first computed token
        self.preempted: set[int] = set()
        self.aborted: set[int] = set()

    def added(self, seq):
        self.seqs[seq.seq_id] = seq
        self.status[seq.seq_id] = seq.status
        self.samples[seq.seq_id] = []

    def scheduled(self, batch):
        for seq in batch.seqs:
            if seq.seq_id not in self.admitted:
                self.admitted.append(seq.seq_id)

    def sampled(self, batch, tokens):
        for seq, token in zip(batch.seqs, tokens):
            if token is not None and not seq.is_finished:
                self.samples[seq.seq_id].append((seq.num_tokens, token))

    def step_done(self):
        for seq_id, seq in self.seqs.items():
            before, now = self.status[seq_id], seq.status
            assert (before, now) in LEGAL, f"seq {seq_id}: {before} -> {now}"
            if before == RUNNING and now == WAITING:  # preemption by recompute
                self.preempted.add(seq_id)
                assert not seq.block_table and seq.num_cached_tokens == 0
            if now == FINISHED:
                assert not seq.block_table
            self.status[seq_id] = now
            # What was produced is exactly what was appended, in order.
            assert seq.completion_token_ids == [t for _, t in self.samples[seq_id]]
        check_block_accounting(self.scheduler)

    def finished(self, max_model_len):
        manager = self.scheduler.block_manager
        assert manager.num_free_blocks == manager.num_blocks
        arrival = list(self.seqs)
        assert self.admitted == [i for i in arrival if i in self.admitted], "admitted out of arrival order"
        for seq_id, seq in self.seqs.items():
            assert seq.status == FINISHED, f"seq {seq_id} starved"
            positions = [p for p, _ in self.samples[seq_id]]
            assert positions == list(range(seq.num_prompt_tokens, seq.num_tokens)), f"seq {seq_id}"
            if seq_id not in self.aborted:
                check_finish_reason(seq, max_model_len)


def step_checked(scheduler, model, checker, postprocess=True):
    """One engine step by hand, under the checker; returns the batch."""
    batch = scheduler.schedule()
    checker.scheduled(batch)
    if postprocess:
        tokens = model.step(batch)
        checker.sampled(batch, tokens)
        scheduler.postprocess(batch, tokens)
        checker.step_done()
    return batch


def stops_at(seq, i):
    """Whether completion token i (0-based) may end the request with reason "stop"."""
    params, token = seq.params, seq.completion_token_ids[i]
    return i + 1 >= params.min_tokens and ((token == EOS and not params.ignore_eos)
                                           or token in params.stop_token_ids)


def check_finish_reason(seq, max_model_len):
    completion = seq.completion_token_ids
    assert completion, f"seq {seq.seq_id} produced nothing"
    assert not any(stops_at(seq, i) for i in range(len(completion) - 1)), f"seq {seq.seq_id} ran past a stop"
    limit = len(completion) == seq.params.max_tokens or seq.num_tokens == max_model_len
    assert len(completion) <= seq.params.max_tokens and seq.num_tokens <= max_model_len
    if stops_at(seq, len(completion) - 1):
        assert seq.finish_reason == "stop"
    else:
        assert seq.finish_reason == "length" and limit, (seq.seq_id, seq.finish_reason, len(completion))


def run(scheduler, arrivals, abort_at=None, model=None, max_steps=20_000, checker=None):
    """Drive the engine loop under the invariant checker; returns the model and the checker.

    arrivals: (step, Sequence) pairs; abort_at: {step: seq_id}.
    """
    model = model or FakeModel(scheduler)
    checker = checker or Invariants(scheduler)
    pending = sorted(arrivals, key=lambda arrival: arrival[0])
    abort_at = abort_at or {}
    step = 0
    while pending or scheduler.has_unfinished():
        while pending and pending[0][0] <= step:
            seq = pending.pop(0)[1]
            scheduler.add(seq)
            checker.added(seq)
        if step in abort_at:
            checker.aborted.add(abort_at[step])
            scheduler.abort(abort_at[step])
        batch = scheduler.schedule()
        if batch is None:
            assert not scheduler.has_unfinished()
        else:
            checker.scheduled(batch)
            tokens = model.step(batch)
            checker.sampled(batch, tokens)
            for seq in scheduler.postprocess(batch, tokens):
                assert seq.is_finished and not seq.block_table
        checker.step_done()
        step += 1
        assert step < max_steps, "no progress"
    checker.finished(scheduler.max_model_len)
    return model, checker


def random_requests(rng, count, block_size, max_prompt_len, shared_prefix=()):
    requests = []
    for _ in range(count):
        prompt = list(shared_prefix) + [rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(1, max_prompt_len))]
        max_tokens = rng.randint(1, 30)
        params = SamplingParams(max_tokens=max_tokens, min_tokens=rng.choice([0, 0, min(3, max_tokens)]),
                                ignore_eos=rng.random() < 0.2,
                                stop_token_ids=[rng.randrange(VOCAB_SIZE)] if rng.random() < 0.3 else None)
        requests.append(Sequence(prompt, params, block_size))
    # Repeat some prompts exactly: whole-prompt prefix hits.
    for seq in requests[:count // 4]:
        requests.append(Sequence(seq.prompt_token_ids, SamplingParams(max_tokens=5), block_size))
    return requests


CONFIGS = {
    # name: (max_num_seqs, max_num_batched_tokens, num_blocks, block_size)
    "roomy": (8, 256, 1000, 4),
    "tiny_pool": (8, 256, 18, 4),
    "chunked": (4, 7, 1000, 4),
    "tiny_pool_chunked": (6, 9, 14, 8),
    "block_size_1": (5, 16, 70, 1),
}
MAX_MODEL_LEN = 64


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("config", CONFIGS)
def test_concurrent_streams_keep_the_invariants(config, prefix_caching):
    max_num_seqs, max_num_batched_tokens, num_blocks, block_size = CONFIGS[config]
    rng = random.Random(config)
    scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, MAX_MODEL_LEN, num_blocks, block_size,
                          {EOS}, enable_prefix_caching=prefix_caching)
    shared_prefix = [rng.randrange(VOCAB_SIZE) for _ in range(13)]
    requests = (random_requests(rng, 24, block_size, 50)
                + random_requests(rng, 12, block_size, 20, shared_prefix))
    arrivals = [(rng.choice([0, 0, rng.randint(1, 60)]), seq) for seq in requests]
    model, checker = run(scheduler, arrivals)

    assert {"stop", "length"} <= {seq.finish_reason for seq in requests}
    if "tiny_pool" in config:
        assert checker.preempted, "the pool was meant to force preemption"
    if "chunked" in config:
        assert model.partial_chunks
    hits = [tokens for tokens in model.first_prefill_hits.values() if tokens]
    assert bool(hits) == prefix_caching
    for seq in requests:
        hit = model.first_prefill_hits[seq.seq_id]
        assert hit % block_size == 0 and hit < seq.num_prompt_tokens


def test_prefix_hit_reuses_blocks_of_a_finished_request():
    scheduler = Scheduler(4, 64, 64, num_blocks=10, block_size=4, eos_token_ids=set())
    prompt = list(range(10, 20))
    first = Sequence(prompt, SamplingParams(max_tokens=1), 4)
    run(scheduler, [(0, first)])
    # first computed its 10 prompt tokens: blocks 0 and 1 are full and registered.

    second = Sequence(prompt, SamplingParams(max_tokens=1), 4)
    scheduler.add(second)
    batch = scheduler.schedule()
    assert batch.is_prefill and batch.seqs == [second]
    assert second.num_cached_tokens == 8 and batch.num_new_tokens == [2]
    assert scheduler.block_manager.num_free_blocks == 10 - 3

    third = Sequence(prompt[:8], SamplingParams(max_tokens=1), 4)
    scheduler.add(third)
    batch = scheduler.schedule()
    # Its whole prompt is cached, but its last block is recomputed to get the logits.
    assert third.num_cached_tokens == 4 and batch.num_new_tokens == [4]
    assert third.block_table[0] == second.block_table[0]
    assert third.block_table[1] != second.block_table[1]


def test_chunked_prefill_keeps_the_partial_sequence_at_the_head():
    scheduler = Scheduler(4, 4, 64, num_blocks=20, block_size=4, eos_token_ids=set())
    long = Sequence(list(range(1, 11)), SamplingParams(max_tokens=2), 4)
    short = Sequence([5, 6], SamplingParams(max_tokens=2), 4)
    scheduler.add(long)
    scheduler.add(short)
    model = FakeModel(scheduler)
    chunks = []
    for _ in range(3):
        batch = scheduler.schedule()
        chunks.append(([seq.seq_id for seq in batch.seqs], batch.num_new_tokens, batch.is_prefill))
        scheduler.postprocess(batch, model.step(batch))
    assert chunks == [
        ([long.seq_id], [4], True),
        ([long.seq_id], [4], True),
        ([long.seq_id, short.seq_id], [2, 2], True),
    ]
    assert scheduler.num_running == 2 and scheduler.num_waiting == 0
    batch = scheduler.schedule()
    assert not batch.is_prefill and batch.num_new_tokens == [1, 1]


def test_preemption_recomputes_the_most_recent_sequences_first():
    # Blocks of 2 tokens: each 2-token prompt fills one block and needs a second at its 3rd token.
    scheduler = Scheduler(8, 64, 64, num_blocks=5, block_size=2, eos_token_ids=set())
    a, b, c, d = (Sequence([i, i + 1], SamplingParams(max_tokens=3), 2) for i in (1, 3, 5, 7))
    e = Sequence([9, 9, 9, 9], SamplingParams(max_tokens=2), 2)
    model, checker = FakeModel(scheduler), Invariants(scheduler)
    for seq in (a, b, c, d, e):
        scheduler.add(seq)
        checker.added(seq)
    batch = step_checked(scheduler, model, checker)
    assert batch.seqs == [a, b, c, d]  # e needs 2 blocks, 1 is free

    batch = step_checked(scheduler, model, checker, postprocess=False)
    # a takes the free block; b gets d's; c finds none and, last left, preempts itself.
    assert batch.seqs == [a, b] and not batch.is_prefill
    assert list(scheduler.waiting) == [c, d, e]
    assert all(seq.block_table == [] and seq.num_cached_tokens == 0 and seq.status == SequenceStatus.WAITING
               for seq in (c, d))
    tokens = model.step(batch)
    checker.sampled(batch, tokens)
    scheduler.postprocess(batch, tokens)
    checker.step_done()
    run(scheduler, [], model=model, checker=checker)
    assert checker.preempted == {c.seq_id, d.seq_id}


def test_postprocess_finish_reasons():
    scheduler = Scheduler(8, 64, max_model_len=6, num_blocks=20, block_size=4, eos_token_ids={2})
    min_tokens = Sequence([5], SamplingParams(max_tokens=9, min_tokens=2), 4)
    ignore_eos = Sequence([5], SamplingParams(max_tokens=9, ignore_eos=True, stop_token_ids=[3]), 4)
    max_tokens = Sequence([5], SamplingParams(max_tokens=2), 4)
    model_len = Sequence([5, 5, 5], SamplingParams(max_tokens=9), 4)
    eos_at_last = Sequence([5], SamplingParams(max_tokens=1), 4)
    eos_at_min = Sequence([5], SamplingParams(max_tokens=9, min_tokens=2), 4)  # EOS at its min_tokens-th token
    seqs = [min_tokens, ignore_eos, max_tokens, model_len, eos_at_last, eos_at_min]
    for seq in seqs:
        scheduler.add(seq)
    script = {min_tokens: [2, 9, 2], ignore_eos: [2, 2, 3], max_tokens: [9, 9],
              model_len: [9, 9, 9], eos_at_last: [2], eos_at_min: [2, 2]}
    finished_at = {}
    step = 0
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        sampled = [script[seq].pop(0) for seq in batch.seqs]
        for seq in scheduler.postprocess(batch, sampled):
            finished_at[seq] = step
        step += 1
    assert (min_tokens.completion_token_ids, min_tokens.finish_reason) == ([2, 9, 2], "stop")
    assert (ignore_eos.completion_token_ids, ignore_eos.finish_reason) == ([2, 2, 3], "stop")
    assert (max_tokens.completion_token_ids, max_tokens.finish_reason) == ([9, 9], "length")
    assert (model_len.completion_token_ids, model_len.finish_reason) == ([9, 9, 9], "length")
    assert (eos_at_last.completion_token_ids, eos_at_last.finish_reason) == ([2], "stop")
    assert (eos_at_min.completion_token_ids, eos_at_min.finish_reason) == ([2, 2], "stop")
    assert finished_at == {eos_at_last: 0, max_tokens: 1, eos_at_min: 1, min_tokens: 2, ignore_eos: 2, model_len: 2}
    assert scheduler.block_manager.num_free_blocks == 20


def test_postprocess_rejects_a_sample_where_none_is_due():
    scheduler = Scheduler(4, 4, 64, num_blocks=10, block_size=4, eos_token_ids=set())
    scheduler.add(Sequence(list(range(6)), SamplingParams(), 4))
    batch = scheduler.schedule()
    assert batch.num_new_tokens == [4]
    with pytest.raises(RuntimeError, match="sample"):
        scheduler.postprocess(batch, [1])


def test_abort_frees_blocks_and_leaves_other_streams_alone():
    rng = random.Random(5)
    scheduler = Scheduler(4, 6, MAX_MODEL_LEN, num_blocks=40, block_size=4, eos_token_ids={EOS})
    requests = random_requests(rng, 10, 4, 30)
    aborted = [requests[0].seq_id, requests[3].seq_id, requests[-1].seq_id]
    run(scheduler, [(0, seq) for seq in requests], abort_at={1: aborted[0], 6: aborted[1], 7: aborted[2]})
    for seq in requests:
        if seq.seq_id in aborted:
            assert seq.finish_reason == "abort" and seq.is_finished and not seq.block_table


def test_abort_in_every_state():
    scheduler = Scheduler(2, 4, 64, num_blocks=10, block_size=4, eos_token_ids=set())
    running = Sequence([1, 2], SamplingParams(max_tokens=9), 4)
    partial = Sequence(list(range(1, 11)), SamplingParams(max_tokens=9), 4)
    waiting = Sequence([3], SamplingParams(max_tokens=9), 4)
    for seq in (running, partial, waiting):
        scheduler.add(seq)
    model = FakeModel(scheduler)
    batch = scheduler.schedule()  # running: 2 tokens, partial: first 2 of 10
    scheduler.postprocess(batch, model.step(batch))
    assert partial.block_table and partial.status == SequenceStatus.WAITING

    assert scheduler.abort(partial.seq_id) is partial
    assert scheduler.abort(waiting.seq_id) is waiting
    batch = scheduler.schedule()
    assert batch.seqs == [running]
    sampled = model.step(batch)
    assert scheduler.abort(running.seq_id) is running  # while the step runs
    assert scheduler.postprocess(batch, sampled) == []
    assert scheduler.abort(running.seq_id) is None
    assert all(seq.finish_reason == "abort" and not seq.block_table for seq in (running, partial, waiting))
    assert not scheduler.has_unfinished() and scheduler.schedule() is None
    assert scheduler.block_manager.num_free_blocks == 10


def test_finish_by_the_caller():
    scheduler = Scheduler(2, 8, 64, num_blocks=10, block_size=4, eos_token_ids=set())
    seq = Sequence([1, 2, 3], SamplingParams(max_tokens=9), 4)
    scheduler.add(seq)
    batch = scheduler.schedule()
    scheduler.postprocess(batch, FakeModel(scheduler).step(batch))
    scheduler.finish(seq, "stop")  # e.g. a stop string matched
    assert seq.finish_reason == "stop" and seq.status == SequenceStatus.FINISHED
    assert scheduler.num_running == 0 and scheduler.block_manager.num_free_blocks == 10


@pytest.mark.parametrize("prompt, match", [
    ([], "prompt is empty"),
    (list(range(8)), "prompt has 8 tokens but max_model_len is 8"),
    (list(range(7)), "needs 2 KV blocks but the cache has only 1"),
])
def test_add_rejects_bad_prompts(prompt, match):
    scheduler = Scheduler(2, 8, max_model_len=8, num_blocks=1, block_size=4, eos_token_ids=set())
    with pytest.raises(ValueError, match=match):
        scheduler.add(Sequence(prompt, SamplingParams(), 4))
    assert not scheduler.has_unfinished()


def test_sequence_outgrowing_the_whole_cache_is_a_clear_error():
    scheduler = Scheduler(2, 8, max_model_len=100, num_blocks=2, block_size=4, eos_token_ids=set())
    seq = Sequence([1, 2, 3], SamplingParams(max_tokens=50), 4)
    scheduler.add(seq)
    model = FakeModel(scheduler)
    with pytest.raises(RuntimeError, match="needing 3 KV blocks, but the cache has only 2"):
        for _ in range(20):
            batch = scheduler.schedule()
            scheduler.postprocess(batch, model.step(batch))
    assert seq.num_tokens == 9 and seq.status == SequenceStatus.WAITING


def test_constructor_rejects_a_token_budget_below_the_batch_size():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(8, 4, 64, num_blocks=10, block_size=4, eos_token_ids=set())
