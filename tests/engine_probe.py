"""Looks into a running LLM for the tests: all-position prompt logits through the paged cache,
the generated tokens, and whether every block (and state slot) is free again."""
from __future__ import annotations

import numpy as np


def prefill_logits(llm, prompts: list[list[int]]) -> list[np.ndarray]:
    """All-position logits of the prompts, prefilled together as one batch through the paged
    cache (on every rank under tensor parallelism)."""
    from mindcpm import SamplingParams
    from mindcpm.engine.sequence import Sequence
    runner, blocks = llm.engine.runner, llm.engine.scheduler.block_manager
    seqs = [Sequence(p, SamplingParams(), blocks.block_size) for p in prompts]
    for s in seqs:
        blocks.allocate(s)
        s.num_cached_tokens = 0
    try:
        inputs, _, width = runner.prepare(seqs, [len(p) for p in prompts], all_rows=True)
        logits = runner.forward(inputs).asnumpy()
    finally:
        for s in seqs:
            blocks.deallocate(s)
    return [logits[i * width: i * width + len(p)] for i, p in enumerate(prompts)]


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def all_free(llm) -> bool:
    blocks = llm.engine.scheduler.block_manager
    return (blocks.num_free_blocks == blocks.num_blocks
            and getattr(blocks, "num_free_state_slots", 0) == getattr(blocks, "num_state_slots", 0))


def run_with_random_aborts(engine, prompts, params, rate: float, seed: int = 0) -> list:
    """Steps the engine over the prompts, aborting each unfinished request with probability `rate`
    after every step; returns the request states in prompt order."""
    import random
    rng = random.Random(seed)
    states = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
        for s in states:
            if not s.finished and rng.random() < rate:
                engine.abort(s.seq.seq_id)
                s.finished = True
    return states
