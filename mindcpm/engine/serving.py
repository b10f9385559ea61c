"""The engine behind the HTTP server: ONE thread owns the LLMEngine and steps it; request
handlers on the asyncio loop reach it only through a thread-safe inbox (add / abort) and each
request's asyncio queue of events. MindSpore graphs, the scheduler and the block pool are thus
only ever touched by that thread, and every client shares its continuous batch."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..sampling import SamplingParams
from .llm_engine import RequestState

logger = logging.getLogger("mindcpm")

# Seconds; the upper end covers a CPU prefill of a long prompt behind a busy batch.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


@dataclass
class Event:
    """What one step did for one request."""
    delta: str = ""  # new visible text
    token_ids: list[int] = field(default_factory=list)  # new tokens
    logprobs: list = field(default_factory=list)  # their vLLM-shaped entries, when asked for
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    error: str | None = None  # the request could not run (a one-line reason)


class ServedRequest:
    def __init__(self, token_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.token_ids = token_ids
        self.params = params
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.arrival = time.perf_counter()
        self.state: RequestState | None = None  # set by the engine thread
        self.num_sent = 0  # completion tokens already in events
        self.last_token_time = 0.0

    def push(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Metrics:
    """Prometheus metrics of one server (its own registry, so several can live in a process)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("mindcpm:num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("mindcpm:num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.blocks_used = Gauge("mindcpm:kv_cache_blocks_used", "KV-cache blocks in use", registry=r)
        self.blocks_total = Gauge("mindcpm:kv_cache_blocks_total", "KV-cache blocks in the pool", registry=r)
        self.compile_seconds = Gauge("mindcpm:graph_compile_seconds", "Seconds spent compiling step graphs",
                                     registry=r)
        self.prompt_tokens = Counter("mindcpm:prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("mindcpm:generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter("mindcpm:request_success", "Finished requests by reason", ["finished_reason"],
                                registry=r)
        self.ttft = Histogram("mindcpm:time_to_first_token_seconds", "Arrival to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("mindcpm:inter_token_latency_seconds", "Time between tokens of a request",
                             buckets=ITL_BUCKETS, registry=r)

    def observe_engine(self, engine) -> None:
        scheduler = engine.scheduler
        blocks = scheduler.block_manager
        self.running.set(scheduler.num_running)
        self.waiting.set(scheduler.num_waiting)
        self.blocks_total.set(blocks.num_blocks)
        self.blocks_used.set(blocks.num_blocks - blocks.num_free_blocks)
        self.compile_seconds.set(engine.runner.compile_seconds)


class EngineLoop:
    """Owns llm.engine on its own thread. `capacity` bounds the requests accepted and not yet
    finished (running + waiting); submit() refuses more, so the queue cannot grow without bound."""

    def __init__(self, llm, max_waiting: int, warmup: bool = True):
        self.llm = llm
        self.engine = llm.engine
        self.metrics = Metrics()
        self.capacity = self.engine.scheduler.max_num_seqs + max_waiting
        self.warmup = warmup
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.active: dict[int, ServedRequest] = {}  # seq id -> request; engine thread only
        self.in_flight = 0
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="mindcpm-engine", daemon=True)

    # -- any thread ----------------------------------------------------------------------
    def start(self) -> None:
        """Starts the thread and waits for its warm-up (graph compilation) to finish."""
        self.thread.start()
        self.ready.wait()
        if self.failure is not None:
            raise self.failure

    def stop(self) -> None:
        self.stopping = True
        self.inbox.put(None)
        self.thread.join(timeout=30)

    def submit(self, request: ServedRequest) -> bool:
        """Queues the request for the engine; False when `capacity` requests are in flight."""
        with self.lock:
            if self.in_flight >= self.capacity:
                return False
            self.in_flight += 1
        self.inbox.put(("add", request))
        return True

    def abort(self, request: ServedRequest) -> None:
        self.inbox.put(("abort", request))

    # -- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.warmup:
                self._warm_up()
            self.metrics.observe_engine(self.engine)
        except BaseException as e:  # noqa: BLE001 (reported by start())
            self.failure = e
            return
        finally:
            self.ready.set()
        while not self.stopping:
            self._take_commands(block=not self.engine.has_unfinished())
            if self.engine.has_unfinished():
                self._step()
            self.metrics.observe_engine(self.engine)

    def _warm_up(self) -> None:
        """Compiles the graphs of a lone request and of a full batch draining one by one (every
        decode batch-size bucket), so the first clients do not wait for compilation."""
        ids = self.llm.tokenizer.encode("Hello")
        n = self.engine.scheduler.max_num_seqs
        params = [SamplingParams(temperature=0.0, max_tokens=i + 2, ignore_eos=True) for i in range(n)]
        self.llm.generate([{"prompt_token_ids": ids}], params[0])
        self.llm.generate([{"prompt_token_ids": ids}] * n, params)

    def _take_commands(self, block: bool) -> None:
        try:
            command = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            while True:
                if command is not None:
                    kind, request = command
                    (self._add if kind == "add" else self._abort)(request)
                command = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _add(self, request: ServedRequest) -> None:
        try:
            request.state = self.engine.add_request(request.token_ids, request.params)
        except ValueError as e:
            self._release()
            request.push(Event(finished=True, error=str(e)))
            return
        self.active[request.state.seq.seq_id] = request
        self.metrics.prompt_tokens.inc(len(request.token_ids))

    def _abort(self, request: ServedRequest) -> None:
        state = request.state
        if state is None or self.active.pop(state.seq.seq_id, None) is None:
            return  # never admitted, or already finished
        self.engine.abort(state.seq.seq_id)
        self.metrics.finished.labels("abort").inc()
        self._release()

    def _step(self) -> None:
        try:
            touched = self.engine.step()
        except Exception as e:  # noqa: BLE001 (a bug: fail the batch's requests, keep serving)
            logger.error("engine step failed: %s", e, exc_info=True)
            for request in list(self.active.values()):
                self._abort(request)
                request.push(Event(finished=True, error=f"internal error: {e}"))
            return
        now = time.perf_counter()
        for state in touched:
            request = self.active.get(state.seq.seq_id)
            if request is not None:
                self._dispatch(request, state, now)

    def _dispatch(self, request: ServedRequest, state: RequestState, now: float) -> None:
        seq = state.seq
        new_ids = seq.completion_token_ids[request.num_sent:]
        self._time_tokens(request, len(new_ids), now)
        logprobs = seq.logprobs[request.num_sent:] if seq.params.logprobs is not None else []
        request.num_sent += len(new_ids)
        delta = state.visible_text[state.emitted:]
        state.emitted += len(delta)
        self.metrics.generation_tokens.inc(len(new_ids))
        event = Event(delta, new_ids, logprobs, state.finished, seq.finish_reason if state.finished else None,
                      state.stop_reason, seq.num_prompt_tokens, seq.num_completion_tokens)
        if state.finished:
            self.active.pop(seq.seq_id, None)
            self.metrics.finished.labels(seq.finish_reason).inc()
            self._release()
        request.push(event)

    def _time_tokens(self, request: ServedRequest, count: int, now: float) -> None:
        """A step gives a request at most one token: its first is TTFT, later ones ITL."""
        if not count:
            return
        if request.num_sent == 0:
            self.metrics.ttft.observe(now - request.arrival)
        else:
            self.metrics.itl.observe(now - request.last_token_time)
        request.last_token_time = now

    def _release(self) -> None:
        with self.lock:
            self.in_flight -= 1
