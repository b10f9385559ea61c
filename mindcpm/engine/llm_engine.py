"""The step loop: scheduler -> runner -> scheduler, plus the text side of every request
(incremental detokenization and stop strings)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..sampling import SamplingParams
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Sequence


@dataclass
class RequestState:
    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    text: str = ""
    emitted: int = 0  # characters of `text` already handed to a stream
    stop_len: int = 0  # longest stop string: that much text is held back until it cannot start one
    finished: bool = False
    new_token_ids: list[int] = field(default_factory=list)

    @property
    def visible_text(self) -> str:
        if self.finished or not self.stop_len:
            return self.text
        return self.text[: max(len(self.text) - self.stop_len + 1, 0)]


@dataclass
class StepStats:
    """Token counts and seconds of prefill and decode steps, compile time excluded."""
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    def record(self, is_prefill: bool, tokens: int, seconds: float) -> None:
        if is_prefill:
            self.prefill_tokens += tokens
            self.prefill_seconds += seconds
        else:
            self.decode_tokens += tokens
            self.decode_seconds += seconds

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class LLMEngine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer: Tokenizer):
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.requests: dict[int, RequestState] = {}
        self.stats = StepStats()

    def add_request(self, token_ids: list[int], params: SamplingParams, prompt: str | None = None) -> RequestState:
        seq = Sequence(token_ids, params, self.scheduler.block_manager.block_size)
        seq.rng = np.random.default_rng(params.seed)
        self.scheduler.add(seq)
        state = RequestState(seq, prompt, IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens),
                             stop_len=max((len(s) for s in params.stop), default=0))
        self.requests[seq.seq_id] = state
        return state

    def abort(self, seq_id: int) -> None:
        state = self.requests.pop(seq_id, None)
        if state is not None and not state.finished:
            self.scheduler.finish(state.seq, "abort")
            state.finished = True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestState]:
        """Runs one scheduled step; returns the requests that produced a token or finished."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        start = time.perf_counter()
        compile_before = self.runner.compile_seconds
        sampled = self.runner.run(batch.seqs, batch.num_new_tokens)
        seconds = time.perf_counter() - start - (self.runner.compile_seconds - compile_before)
        self.stats.record(batch.is_prefill, sum(batch.num_new_tokens), seconds)
        self.scheduler.postprocess(batch, sampled)
        touched = []
        for seq, token in zip(batch.seqs, sampled):
            if token is None:
                continue
            state = self.requests[seq.seq_id]
            state.new_token_ids.append(token)
            self._append_text(state, token)
            state.finished = seq.is_finished
            touched.append(state)
        for state in touched:
            if state.finished:
                self.requests.pop(state.seq.seq_id, None)
        return touched

    def _append_text(self, state: RequestState, token: int) -> None:
        seq = state.seq
        if seq.finish_reason == "stop" and not seq.params.include_stop_str_in_output and \
                token in self._stop_ids(seq.params):
            return  # vLLM leaves the stopping EOS / stop token out of the text
        piece = state.detokenizer.add(token)
        if not piece:
            return
        state.text += piece
        if not seq.params.stop or seq.is_finished:
            return
        # A stop string can straddle the previous text and this piece.
        window_start = max(len(state.text) - len(piece) - state.stop_len + 1, 0)
        hits = [(state.text.find(s, window_start), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            at, stop = min(hits)
            state.text = state.text[: at + len(stop)] if seq.params.include_stop_str_in_output else state.text[:at]
            self.scheduler.finish(seq, "stop")

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= set(self.scheduler.eos_token_ids)
        return ids
