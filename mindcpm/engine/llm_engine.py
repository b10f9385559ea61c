"""The step loop: scheduler -> runner -> scheduler, plus the text side of every request
(incremental detokenization and stop strings)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import mindspore as ms
import numpy as np

from ..sampling import SamplingParams
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Sequence
from .spec_decode import SpecStats, SpeculativeConfig, can_speculate, make_proposer, record_outcome, wants_draft


@dataclass
class RequestState:
    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    text: str = ""
    emitted: int = 0  # characters of `text` already handed to a stream
    # A stream holds back this many characters: the start of a stop string not yet complete,
    # which must not reach the client if it completes (vLLM: longest stop string - 1).
    hold_back: int = 0
    # Stop strings must end past this offset: text of the first min_tokens tokens is not searched.
    stop_check_offset: int = 0
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it (vLLM)
    finished: bool = False
    new_token_ids: list[int] = field(default_factory=list)

    @property
    def visible_text(self) -> str:
        if self.finished:
            return self.text
        return self.text[: max(len(self.text) - self.hold_back, 0)]


@dataclass
class StepStats:
    """Token counts and seconds of prefill and decode steps, and graph compilation apart."""
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0

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
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer: Tokenizer,
                 speculative: SpeculativeConfig | None = None):
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        runner.reserve_next_slot = scheduler.block_manager.reserve_next_slot  # for chained decode steps
        self.requests: dict[int, RequestState] = {}
        self.stats = StepStats()
        self.proposer = make_proposer(speculative, runner)
        # A draft head reads the target's hidden states: it drafts after scheduling and catches up
        # after each target step (engine/drafter.py).
        self.drafter = self.proposer if getattr(self.proposer, "uses_target_hidden", False) else None
        self.spec_stats = SpecStats()

    def add_request(self, token_ids: list[int], params: SamplingParams, prompt: str | None = None) -> RequestState:
        seq = Sequence(token_ids, params, self.scheduler.block_manager.block_size)
        seq.rng = np.random.default_rng(params.seed)
        self.scheduler.add(seq)
        hold_back = 0 if params.include_stop_str_in_output else max((len(s) - 1 for s in params.stop), default=0)
        state = RequestState(seq, prompt, IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens),
                             hold_back=hold_back)
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
        """Runs one step (propose drafts -> schedule -> run and sample/verify -> post-process);
        returns the requests that produced a token or finished."""
        self._propose_drafts()
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        num_drafts = [len(seq.spec_token_ids) for seq in batch.seqs]
        sampled = self._run(batch)
        for seq, k, tokens in zip(batch.seqs, num_drafts, sampled):
            if k:
                self.spec_stats.record(k, len(tokens) - 1)
                record_outcome(seq, len(tokens) - 1)
        touched: dict[int, RequestState] = {}

        def on_token(seq: Sequence, token: int) -> None:
            state = touched[seq.seq_id] = self.requests[seq.seq_id]
            state.new_token_ids.append(token)
            self._append_text(state, token)

        self.scheduler.postprocess(batch, sampled, on_token)
        for state in touched.values():
            state.finished = state.seq.is_finished
            if state.finished:
                self.requests.pop(state.seq.seq_id, None)
        return list(touched.values())

    def _propose_drafts(self) -> None:
        """Draft tokens for each running sequence whose next step is a decode step; capped so that
        the chain never computes past max_tokens or max_model_len."""
        if self.proposer is None:
            return
        max_model_len = self.scheduler.max_model_len
        for seq in self.scheduler.running:
            params = seq.params
            if (seq.num_cached_tokens != seq.num_tokens - 1 or not can_speculate(params, seq.num_completion_tokens)
                    or not wants_draft(seq)):
                seq.spec_token_ids = []
                continue
            limit = min(params.max_tokens - seq.num_completion_tokens - 1, max_model_len - seq.num_tokens)
            seq.spec_token_ids = (self.drafter.reserve(seq, limit) if self.drafter is not None
                                  else self.proposer.propose(seq.token_ids, limit))

    def _run(self, batch) -> list[list[int] | None]:
        """Runs the batch and records its seconds (a graph's compilation apart)."""
        compile_before = self.runner.compile_seconds
        draft_compile_before = self.drafter.compile_seconds if self.drafter is not None else 0.0
        start = time.perf_counter()
        if self.drafter is not None:
            self.drafter.extend(batch)
        sampled = self.runner.run(batch.seqs, batch.num_new_tokens)
        if self.drafter is not None:
            self.drafter.catch_up(batch, sampled, self.runner.last_hidden)
            draft_compile = self.drafter.compile_seconds - draft_compile_before
            self.stats.compile_seconds += draft_compile
            start += draft_compile
        seconds = time.perf_counter() - start
        first_call = self.runner.compile_seconds - compile_before
        if first_call:
            # The step compiled its graph and ran it; its run alone is timed on a second call.
            run_seconds = self._time_compiled_step(batch)
            self.stats.compile_seconds += max(first_call - run_seconds, 0.0)
            seconds += run_seconds - first_call
        tokens = sum(batch.num_new_tokens) if batch.is_prefill else sum(len(t) for t in sampled)
        self.stats.record(batch.is_prefill, tokens, seconds)
        return sampled

    def _time_compiled_step(self, batch) -> float:
        """Seconds of one run of the graph `batch` just compiled, on the same inputs (before
        postprocess, so prepare() rebuilds them): the K/V it writes again are the same values, and
        a linear-attention state slot is pointed at the padding slot so no sequence's state moves."""
        runner = self.runner
        for all_rows in (False, True):  # the graph with every row's logits (prompt logprobs) or not
            inputs, _, _ = runner.prepare(batch.seqs, batch.num_new_tokens, all_rows)
            if tuple(t.shape for t in inputs) in runner.compiled_shapes:
                break
        names = runner.step_inputs
        if "state_slots" in names:
            i = names.index("state_slots")
            inputs[i] = ms.from_numpy(np.full(inputs[i].shape, runner.pad_state_slot, np.int32))
        start = time.perf_counter()
        runner.forward(inputs).asnumpy()
        return time.perf_counter() - start

    def _append_text(self, state: RequestState, token: int) -> None:
        seq, params = state.seq, state.seq.params
        stopped_by_token = seq.finish_reason == "stop" and token in self._stop_ids(params)
        if stopped_by_token and token in params.stop_token_ids:
            state.stop_reason = token
        if stopped_by_token and not params.include_stop_str_in_output:
            return  # vLLM leaves the stopping EOS / stop token out of the text
        state.text += state.detokenizer.add(token)
        if seq.num_completion_tokens <= params.min_tokens:
            state.stop_check_offset = len(state.text)  # no stop string before min_tokens (vLLM)
            return
        if not params.stop or stopped_by_token:
            return
        found = find_stop(state.text, state.stop_check_offset, params.stop, params.include_stop_str_in_output)
        state.stop_check_offset = len(state.text)
        if found is None:
            return
        state.stop_reason, end = found
        state.text = state.text[:end]
        if seq.is_finished:
            # The token that completed the stop string also reached max_tokens / max_model_len:
            # the stop string wins, as in vLLM.
            seq.finish_reason = "stop"
        else:
            self.scheduler.finish(seq, "stop")

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= set(self.scheduler.eos_token_ids)
        return ids


def find_stop(text: str, offset: int, stops: list[str], include: bool) -> tuple[str, int] | None:
    """(the stop string, where the text ends) for the earliest stop string in `text` that ends past
    `offset` (it may start before: it can straddle tokens), or None. The text ends before the stop
    string, or after it when `include`."""
    hits = []
    for stop in stops:
        at = text.find(stop, max(offset - len(stop) + 1, 0))
        if at >= 0:
            hits.append((at, stop))
    if not hits:
        return None
    at, stop = min(hits)
    return stop, at + len(stop) if include else at
