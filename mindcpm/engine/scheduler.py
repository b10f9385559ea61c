"""Continuous batching: which sequences run next, and how many of their tokens.

A step computes token_ids[num_cached_tokens : num_cached_tokens + n] of each scheduled
sequence; a sequence is sampled when that reaches its last token. Prefill steps take priority
over decode steps. A prompt may be prefilled in chunks: the partially prefilled sequence holds
its blocks and stays at the head of the waiting queue until its last chunk is scheduled.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    is_prefill: bool


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 num_blocks: int, block_size: int, eos_token_ids: set[int],
                 enable_prefix_caching: bool = True, num_state_slots: int = 0):
        if max_num_seqs < 1 or max_model_len < 2:
            raise ValueError(f"need max_num_seqs >= 1 and max_model_len >= 2, "
                             f"got {max_num_seqs} and {max_model_len}")
        # A decode step computes one token for every running sequence.
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be "
                             f">= max_num_seqs ({max_num_seqs})")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.eos_token_ids = set(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching, num_state_slots)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()  # in admission order

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        num_tokens = seq.num_tokens
        if num_tokens == 0:
            raise ValueError("prompt is empty")
        if num_tokens >= self.max_model_len:
            raise ValueError(f"prompt has {num_tokens} tokens but max_model_len is {self.max_model_len}")
        if seq.block_size != self.block_size:
            raise ValueError(f"sequence block_size is {seq.block_size} but the cache uses {self.block_size}")
        if seq.num_blocks > self.block_manager.num_blocks:
            raise ValueError(f"prompt has {num_tokens} tokens and needs {seq.num_blocks} KV blocks "
                             f"but the cache has only {self.block_manager.num_blocks}")
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch, or None when nothing is left to run."""
        batch = self._schedule_prefill() or self._schedule_decode()
        if batch is None and self.waiting:
            # Decode preempted a sequence that cannot grow even alone; admitting it raises why.
            batch = self._schedule_prefill()
        return batch

    def _schedule_prefill(self) -> ScheduledBatch | None:
        seqs: list[Sequence] = []
        num_new_tokens: list[int] = []
        token_budget = self.max_num_batched_tokens
        while self.waiting and token_budget > 0:
            seq = self.waiting[0]
            if not seq.block_table and not self._admit(seq):
                break
            n = min(seq.num_tokens - seq.num_cached_tokens, token_budget)
            seqs.append(seq)
            num_new_tokens.append(n)
            token_budget -= n
            if seq.num_cached_tokens + n < seq.num_tokens:
                break  # budget spent mid-prompt; the rest is the next prefill step's
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return ScheduledBatch(seqs, num_new_tokens, is_prefill=True) if seqs else None

    def _admit(self, seq: Sequence) -> bool:
        if len(self.running) >= self.max_num_seqs:
            return False
        if seq.num_blocks > self.block_manager.num_blocks:
            # Only reachable by generation: add() rejects prompts this long.
            raise RuntimeError(
                f"sequence {seq.seq_id} has grown to {seq.num_tokens} tokens, needing {seq.num_blocks} "
                f"KV blocks, but the cache has only {self.block_manager.num_blocks}; lower "
                f"max_model_len or give the cache more blocks")
        if not self.block_manager.can_allocate(seq):
            return False
        self.block_manager.allocate(seq)
        return True

    def _schedule_decode(self) -> ScheduledBatch | None:
        """Every running sequence computes its last token plus its draft tokens, if any. Drafts
        are dropped (never preempting anyone) when the blocks or the token budget cannot take them."""
        scheduled: list[Sequence] = []
        token_budget = self.max_num_batched_tokens - len(self.running)
        while self.running:
            seq = self.running.popleft()
            if len(seq.spec_token_ids) > token_budget or not self.block_manager.can_append(seq, len(seq.spec_token_ids)):
                seq.spec_token_ids = []
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                token_budget -= len(seq.spec_token_ids)
                self.block_manager.may_append(seq, len(seq.spec_token_ids))
                scheduled.append(seq)
        self.running.extend(scheduled)
        if not scheduled:
            return None
        return ScheduledBatch(scheduled, [1 + len(s.spec_token_ids) for s in scheduled], is_prefill=False)

    def _preempt(self, seq: Sequence) -> None:
        """Preempt by recompute: drop the K/V; the sequence re-prefills all its tokens later."""
        self.block_manager.deallocate(seq)
        seq.spec_token_ids = []
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def postprocess(self, batch: ScheduledBatch, sampled: list, on_token=None) -> list[Sequence]:
        """Record a step's computed tokens and samples; returns the sequences it finished.

        sampled[i]: None (a prefill chunk that is not the last), a token id, or the tokens a
        verified draft chain appends (spec_decode.accept_chain). Tokens are appended one by one and
        stop at the first that finishes the sequence; on_token(seq, token) sees each (text, stop
        strings), and may finish the sequence too."""
        finished: list[Sequence] = []
        for seq, n, tokens in zip(batch.seqs, batch.num_new_tokens, sampled, strict=True):
            if seq.is_finished:  # finished by the caller (abort) while the step ran
                continue
            if isinstance(tokens, int):
                tokens = [tokens]
            # Draft tokens past the accepted ones were computed but are not the sequence's.
            accepted = len(tokens) - 1 if tokens else 0
            rejected = len(seq.spec_token_ids) - accepted
            seq.spec_token_ids = []
            seq.num_cached_tokens += n - rejected
            self.block_manager.register_computed_blocks(seq)
            expects_sample = seq.num_cached_tokens == seq.num_tokens + accepted
            if bool(tokens) != expects_sample:
                raise RuntimeError(f"sequence {seq.seq_id}: sample is {tokens!r} but "
                                   f"{seq.num_cached_tokens} of {seq.num_tokens} tokens are computed")
            for token_id in tokens or ():
                seq.append_token(token_id)
                self.block_manager.register_computed_blocks(seq)
                reason = self._finish_reason(seq)
                if reason is not None:
                    self.finish(seq, reason)
                if on_token is not None:
                    on_token(seq, token_id)
                if seq.is_finished:
                    finished.append(seq)
                    break
            if rejected and not seq.is_finished:
                self.block_manager.trim(seq)
        return finished

    def _finish_reason(self, seq: Sequence) -> str | None:
        params = seq.params
        token_id = seq.last_token
        if seq.num_completion_tokens >= params.min_tokens and (
                (token_id in self.eos_token_ids and not params.ignore_eos)
                or token_id in params.stop_token_ids):
            return "stop"
        if seq.num_completion_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish `seq` wherever it is (waiting, partially prefilled or running) and free its blocks."""
        if seq.is_finished:
            return
        for queue in (self.waiting, self.running):
            if seq in queue:
                queue.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, seq_id: int) -> Sequence | None:
        """Finish the unfinished sequence `seq_id` with reason "abort"; None if there is none."""
        for seq in (*self.waiting, *self.running):
            if seq.seq_id == seq_id:
                self.finish(seq, "abort")
                return seq
        return None
