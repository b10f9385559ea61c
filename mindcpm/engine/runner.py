"""Runs one scheduled step: builds its metadata, calls the compiled model graph, samples.

Shapes are bucketed (batch rows, tokens per row, cache blocks per row) to powers of two so a
workload compiles a bounded set of graphs once and never again in steady state.
"""
from __future__ import annotations

import contextlib
import time
import types
from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from ..config import ModelConfig
from ..loader import load_checkpoint, load_dummy_weights
from ..models.registry import model_class
from ..layers.sparse import sparse_step_metadata
from ..ops.device import Device
from ..ops.native import NativeArgmax
from ..parallel import StepChannel, tp_group
from ..sampling import SamplingParams
from .sampler import SampleRequest, Sampler, topk_logprobs
from .sequence import Sequence
from .spec_decode import accept_chain, verify_sampled_chain


@dataclass
class RunnerConfig:
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_model_len: int
    dtype: ms.dtype.Type = ms.float32
    attention: str | None = None  # "native" / "ascend"; None = the device's own
    kernels: bool = False  # the CPU custom kernels (mindcpm/ops/cpu.py) instead of MindSpore's ops
    weight_dtype: ms.dtype.Type | None = None  # 16-bit matrices with fp32 activations (kernels only)
    device: str = "cpu"  # "cpu" / "ascend" (ops/device.py)
    num_speculative_tokens: int = 0  # draft tokens a decode row may verify (0: no speculation)
    compile_prefill: bool = True  # False: start op by op where the device allows (Device.eager_steps)
    quantization: str | None = None  # "int8" / "int4": weights quantized on load (kernels only)
    quant_group_size: int | None = None  # None: the method's default
    hidden_out: bool = False  # keep each step's final hidden states for a draft head (EAGLE)
    aux_hidden_layers: tuple[int, ...] = ()  # or these layers' input hidden states, concatenated (EAGLE-3)


def needs_state_slots(model_cfg: ModelConfig) -> bool:
    return model_cfg.minimax is not None and model_cfg.minimax.has_lightning


def bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


# Tokens per row of a prefill step: powers of two from 16, so prompt chunks of any length share a
# few graphs. A decode row is 1 token wide; a step that verifies draft chains is exactly
# 1 + num_speculative_tokens wide (one graph per batch bucket; a power of two would pad k = 4
# to 8 and make every verified token cost almost twice as much).
PREFILL_MIN_WIDTH = 16


def row_width(num_new: list[int], verify_width: int) -> int:
    longest = max(num_new)
    if longest == 1:
        return 1
    if verify_width and longest <= verify_width:
        return verify_width
    return bucket(longest, minimum=PREFILL_MIN_WIDTH)


class _CompiledStep(nn.Cell):
    """The model's forward as one graph, for one input-shape bucket. Returns the logits and each
    row's arg-max (ties: lowest id): a greedy batch then needs no second graph call to sample
    (a call costs ~1 ms on CPU, the arg-max in this graph ~0.05 ms).

    The "increment" phase puts the cell on MindSpore's inference path: once its first call has
    compiled the graph, later calls run it directly, without ms.jit's per-call argument key and
    autograd bookkeeping (measured: 1.3 ms less per decode step on CPU). That path keeps one graph
    per cell (and would run it on inputs of another shape without a word), so each cell is
    built for one bucket's input shapes and refuses others.

    Its parameters name the graph inputs (Ascend's kernels read some by name: ops/device.py
    STEP_INPUTS); the device gives the jit options (Ascend: infer_boost on), set on this cell too,
    whose run path uses its own jit config."""

    due_for_compile = False

    def __init__(self, model: nn.Cell, shapes: tuple, jit_options: dict | None = None, run_context=None,
                 argmax: nn.Cell | None = None):
        super().__init__()
        self.model = model
        self.argmax = argmax or NativeArgmax()
        self.shapes = shapes
        self.run_context = run_context or (lambda wait: contextlib.nullcontext())  # a fresh one per run
        self.phase = "increment"
        jit_options = jit_options or {}
        if jit_options:
            self.set_jit_config(ms.JitConfig(**jit_options))
        self.construct = types.MethodType(ms.jit(type(self).construct, **jit_options), self)

    def __call__(self, *inputs, wait: bool = True):
        """wait=False: ops that return before their work is done may still run when this returns
        (Device.compiled_run); the next step's graph waits for them, or Device.wait."""
        if tuple(t.shape for t in inputs) != self.shapes:
            raise ValueError(f"a step compiled for input shapes {self.shapes} got {[t.shape for t in inputs]}")
        with self.run_context(wait):
            return super().__call__(*inputs)

    def construct(self, input_ids, positions, batch_valid_length, q_seq_lens, slot_mapping, block_tables,
                  logits_rows, *extra):
        return _with_argmax(self.model(input_ids, positions, batch_valid_length, q_seq_lens, slot_mapping,
                                       block_tables, logits_rows, *extra), self.argmax)


class _EagerStep:
    """The model's forward run op by op (PyNative), for the steps the device does not compile
    yet (Device.eager_steps); the same results as _CompiledStep. After `runs` calls it is due to
    be replaced by its bucket's compiled step."""

    def __init__(self, model: nn.Cell, runs: float, argmax: nn.Cell):
        self.model = model
        self.runs_left = runs
        self.argmax = argmax

    @property
    def due_for_compile(self) -> bool:
        return self.runs_left <= 0

    def __call__(self, *inputs):
        self.runs_left -= 1
        return _with_argmax(self.model(*inputs), self.argmax)


def _with_argmax(outputs, argmax):
    """(logits, arg-max ids, then the model's other outputs: hidden states for a draft head)."""
    if isinstance(outputs, tuple):
        return (outputs[0], argmax(outputs[0])) + outputs[1:]
    return outputs, argmax(outputs)


@dataclass
class _ChainedStep:
    """A decode step launched on the previous step's arg-max ids before they were read
    (ModelRunner._launch_next). Its outputs are the batch's next step's if the batch comes back
    unchanged: the same sequences, each having appended exactly that id."""
    seqs: list[Sequence]
    arrays: list[np.ndarray]  # its inputs as prepared, input_ids (at ids_at) a placeholder
    ids_at: int
    input_ids: Tensor         # the ids it read: the previous step's arg-max, [rows, 1]
    outputs: tuple

    def computes(self, seqs: list[Sequence], arrays: list[np.ndarray]) -> bool:
        if len(seqs) != len(self.seqs) or any(a is not b for a, b in zip(seqs, self.seqs)):
            return False
        if any(a.shape != b.shape for a, b in zip(arrays, self.arrays)):
            return False
        fed = self.input_ids.asnumpy().reshape(-1)[:len(seqs)]
        appended = np.array([seq.token_ids[-1] for seq in seqs])
        return np.array_equal(fed, appended) and all(
            np.array_equal(a, b) for i, (a, b) in enumerate(zip(arrays, self.arrays)) if i != self.ids_at)


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, cfg: RunnerConfig, checkpoint_dir: str | None,
                 eos_token_ids=(), progress: bool = True):
        self.cfg = cfg
        self.model_cfg = model_cfg
        # One block past the scheduler's pool takes the K/V writes of padding tokens.
        self.pad_block = cfg.num_blocks
        self.tp = tp_group()
        self.device = Device(cfg.device, cfg.dtype, cfg.weight_dtype, cfg.kernels, model_cfg.sparse, cfg.block_size,
                             cfg.num_blocks + 1, self.tp, cfg.attention, cfg.compile_prefill, cfg.quantization,
                             cfg.quant_group_size)
        # Linear-attention models get a state slot per sequence, plus one for padding rows.
        self.num_state_slots = cfg.max_num_seqs if needs_state_slots(model_cfg) else 0
        self.pad_state_slot = self.num_state_slots
        extra = {"num_state_slots": self.num_state_slots + 1} if self.num_state_slots else {}
        if cfg.hidden_out or cfg.aux_hidden_layers:
            extra.update(hidden_out=cfg.hidden_out, aux_hidden_layers=cfg.aux_hidden_layers)
        self.model = model_class(model_cfg.architecture)(model_cfg, self.device, **extra)
        self.step_inputs = self.device.step_input_names(self.model)
        self.argmax = self.device.argmax()
        if checkpoint_dir is not None:
            load_checkpoint(self.model, checkpoint_dir, cfg.dtype, progress and self.tp.rank == 0)
            self.device.after_load(self.model)
        self.device.fuse_blocks(self.model)  # after loading: which layers fuse depends on their weights
        self.channel = StepChannel() if self.tp.size > 1 else None
        self.steps: dict[tuple, _CompiledStep | _EagerStep] = {}  # input shapes -> its step
        self.chained: _ChainedStep | None = None  # the batch's next decode step, launched early
        self.chain_counts = {"used": 0, "discarded": 0}  # chained steps whose outputs served, or not
        self.reserve_next_slot = lambda seq: False  # the engine's: BlockManager.reserve_next_slot
        self.sampler = Sampler(eos_token_ids)
        self.verify_width = 1 + cfg.num_speculative_tokens if cfg.num_speculative_tokens else 0
        # Not for a draft head's target (it reads each step's hidden states and verifies chains)
        # nor linear attention (a discarded step would have moved its sequences' states).
        self.chain_decode = (self.device.chains_decode_steps and not self.num_state_slots and not self.verify_width
                             and not (cfg.hidden_out or cfg.aux_hidden_layers))
        self.compile_seconds = 0.0
        self.last_hidden = None

    @property
    def backend_name(self) -> str:
        return self.device.attention_name

    def load_dummy_weights(self, seed: int) -> None:
        """Random weights of the model's shapes (benchmarks), in the device's layout."""
        load_dummy_weights(self.model, seed)
        self.device.after_load(self.model)

    # -- metadata ------------------------------------------------------------------------
    def _blocks_bucket(self, num_tokens: int) -> int:
        bs = self.cfg.block_size
        max_blocks = -(-self.cfg.max_model_len // bs)
        return min(bucket(-(-num_tokens // bs), minimum=max(1, 128 // bs)), bucket(max_blocks))

    def prepare(self, seqs: list[Sequence], num_new: list[int], all_rows: bool):
        """The step's input tensors, in the device's order; the logits row of each sequence's last
        token; the row width."""
        arrays, last_rows, width = self._step_arrays(seqs, num_new, all_rows)
        # from_numpy shares the fresh arrays instead of copying them (1.5 us a tensor against Tensor()'s 9).
        return [ms.from_numpy(a) for a in arrays], last_rows, width

    def _step_arrays(self, seqs: list[Sequence], num_new: list[int], all_rows: bool):
        bs = self.cfg.block_size
        rows = bucket(len(seqs))
        verifying = any(s.spec_token_ids for s in seqs)
        width = row_width(num_new, self.verify_width if verifying else 0)
        all_rows = all_rows or verifying
        nb = self._blocks_bucket(max(s.num_cached_tokens + n for s, n in zip(seqs, num_new)))
        input_ids = np.zeros((rows, width), np.int32)
        positions = np.full((rows, width), -1, np.int32)
        slots = np.full((rows, width), self.pad_block * bs, np.int32)
        tables = np.full((rows, nb), self.pad_block, np.int32)
        last_rows = np.zeros(rows, np.int32)
        # Each row's kv length after this step and its new tokens; padding rows read key 0 of
        # the padding block (ops/ascend.py).
        kv_lens = np.ones(rows, np.int32)
        q_lens = np.ones(rows, np.int32)
        state_slots = np.full(rows, self.pad_state_slot, np.int32)
        for i, (seq, n) in enumerate(zip(seqs, num_new)):
            start = seq.num_cached_tokens
            pos = np.arange(start, start + n, dtype=np.int32)
            table = np.asarray(seq.block_table, np.int32)
            real = min(n, seq.num_tokens - start)  # then the draft tokens to verify
            input_ids[i, :real] = seq.token_ids[start:start + real]
            input_ids[i, real:n] = seq.spec_token_ids[:n - real]
            positions[i, :n] = pos
            slots[i, :n] = table[pos // bs] * bs + pos % bs
            # A chunked prefill holds blocks for its whole prompt; this step reads only those up to
            # its last token, which nb covers.
            tables[i, :min(len(table), nb)] = table[:nb]
            last_rows[i] = i * width + n - 1
            kv_lens[i], q_lens[i] = start + n, n
            if seq.state_slot is not None:
                state_slots[i] = seq.state_slot
        logits_rows = np.arange(rows * width, dtype=np.int32) if all_rows else last_rows
        meta = {"input_ids": input_ids, "positions": positions, "batch_valid_length": kv_lens, "q_seq_lens": q_lens,
                "slot_mapping": slots.reshape(-1), "block_tables": tables, "logits_rows": logits_rows,
                "state_slots": state_slots}
        if self.device.sparse is not None:
            meta.update(sparse_step_metadata(seqs, num_new, tables, width, self.pad_block))
        return [meta[name] for name in self.step_inputs], last_rows, width  # the device names them, in order

    # -- one step -------------------------------------------------------------------------
    def run(self, seqs: list[Sequence], num_new: list[int]) -> list[list[int] | None]:
        """Computes num_new[i] tokens of each sequence; returns the tokens each sequence appends:
        the sample of a sequence whose tokens are now all computed, the accepted drafts and the
        target's next token for a verified draft chain, None for a prefill chunk that is not the last."""
        want_prompt_lp = [s.params.prompt_logprobs is not None and len(s.prompt_logprobs) < s.num_prompt_tokens
                          for s in seqs]
        arrays, last_rows, width = self._step_arrays(seqs, num_new, any(want_prompt_lp))
        chained, self.chained = self.chained, None
        if chained is not None and chained.computes(seqs, arrays):
            outputs = chained.outputs  # complete once the next step's graph has started, or waited for
            self.chain_counts["used"] += 1
        else:
            if chained is not None:
                self.device.wait()  # its head may still write outputs that are about to be freed
                self.chain_counts["discarded"] += 1
            outputs = self._run_step([ms.from_numpy(a) for a in arrays])
        logits, greedy_ids, *hidden = outputs
        if self.chain_decode and self._chainable(seqs, num_new, want_prompt_lp):
            self.chained = self._launch_next(seqs, greedy_ids)
        if chained is not None and self.chained is None:
            self.device.wait()
        # Every position's final hidden state [rows * width, H] and the row width, for a draft head.
        self.last_hidden = (hidden[0], width) if hidden else None
        if any(want_prompt_lp):
            self._record_prompt_logprobs(seqs, num_new, logits, width, want_prompt_lp)
            rows = Tensor(last_rows)
            logits, greedy_ids = logits[rows], greedy_ids[rows]
        return self._sample_or_verify(seqs, num_new, logits, greedy_ids, width)

    def _sample_or_verify(self, seqs, num_new, logits, greedy_ids, width) -> list[list[int] | None]:
        """Samples every logits row a sequence needs: its last token's, or each position of a draft
        chain it verifies; then applies the chain's acceptance rule (spec_decode.accept_chain)."""
        per_token = logits.shape[0] == bucket(len(seqs)) * width  # else one row per sequence
        requests: list[SampleRequest] = []
        rows: list[range] = []  # each sequence's rows of `logits`
        for i, seq in enumerate(seqs):
            if seq.num_cached_tokens + num_new[i] < seq.num_tokens:
                rows.append(range(0))  # a prefill chunk that is not the last
                continue
            last = i * width + num_new[i] - 1 if per_token else i
            first = last - len(seq.spec_token_ids)
            rows.append(range(first, last + 1))
            requests += [_PADDING_REQUEST] * (first - len(requests))
            # A chain sampled from a draft head's q is verified below, without the sampler's draws.
            request = _PADDING_REQUEST if _drafts_sampled(seq) else _sample_request(seq)
            requests += [request] * (last + 1 - first)
        wanted = [s.params.logprobs for s in seqs if s.params.logprobs is not None]
        out = self.sampler(logits, requests, max(wanted) if wanted else -1, greedy_ids)
        appended: list[list[int] | None] = []
        for seq, seq_rows in zip(seqs, rows):
            if not seq_rows:
                appended.append(None)
                continue
            if _drafts_sampled(seq):
                rows_logits = logits[Tensor(np.arange(seq_rows.start, seq_rows.stop, dtype=np.int32))].asnumpy()
                tokens = verify_sampled_chain(seq, rows_logits)
            else:
                tokens = accept_chain(seq.spec_token_ids, out.token_ids[seq_rows.start:seq_rows.stop])
            appended.append(tokens)
            if seq.params.logprobs is not None:  # such requests never speculate (spec_decode.can_speculate)
                r, n = seq_rows.start, seq.params.logprobs
                seq.logprobs.append(_logprob_entry(tokens[0], float(out.logprobs[r]), out.top_ids[r][:n],
                                                   out.top_logprobs[r][:n]))
        return appended

    # -- decode steps chained on the device -------------------------------------------------
    def _chainable(self, seqs, num_new, want_prompt_lp) -> bool:
        """Whether to launch this batch's next decode step before its tokens are read: every
        sequence's next token will be the arg-max (greedy, no penalties, no banned stop ids before
        min_tokens: Sampler), it will still run after this step's token, and it holds the cache
        slot of the next one (reserving its block when the next token starts one)."""
        if any(want_prompt_lp) or any(n != 1 for n in num_new):
            return False
        limit = self.cfg.max_model_len
        for seq in seqs:
            params, done = seq.params, seq.num_completion_tokens + 1  # with this step's token
            if (params.temperature != 0.0 or params.uses_penalties or done < params.min_tokens or seq.spec_token_ids
                    or done >= params.max_tokens or seq.num_tokens + 1 >= limit):
                return False
        bs = self.cfg.block_size
        return all(seq.num_tokens // bs < len(seq.block_table) or self.reserve_next_slot(seq) for seq in seqs)

    def _launch_next(self, seqs, greedy_ids) -> "_ChainedStep | None":
        """Runs the batch's next decode step with this step's arg-max ids as its input tokens,
        read on the device: the graph returns before its LM head is done (Device.compiled_run),
        so the host's work until the step after it (reading this step's tokens, scheduling,
        preparing and launching) overlaps the head. None when that step has no compiled graph."""
        for seq in seqs:  # as if each had appended its token (any id: the graph reads greedy_ids)
            seq.token_ids.append(0)
            seq.num_cached_tokens += 1
        try:
            arrays, _, _ = self._step_arrays(seqs, [1] * len(seqs), False)
        finally:
            for seq in seqs:
                seq.token_ids.pop()
                seq.num_cached_tokens -= 1
        step = self.steps.get(tuple(a.shape for a in arrays))
        if not isinstance(step, _CompiledStep):
            return None
        at = self.step_inputs.index("input_ids")
        if greedy_ids.shape != arrays[at].shape:
            return None
        inputs = [ms.from_numpy(a) for a in arrays]
        inputs[at] = greedy_ids
        return _ChainedStep(list(seqs), arrays, at, greedy_ids, step(*inputs, wait=False))

    def forward(self, inputs):
        """The logits of the step's inputs (see _run_step)."""
        return self._run_step(inputs)[0]

    def _run_step(self, inputs):
        """Runs the compiled step -> (logits, arg-max ids); under tensor parallelism rank 0 first
        sends the step's inputs to the other ranks, which run it too (serve)."""
        if self.tp.size > 1 and self.tp.rank == 0:
            self.channel.send([t.asnumpy() for t in inputs])
        key = tuple(t.shape for t in inputs)
        step = self.steps.get(key)
        if step is None:
            # A decode row (1 token, or 1 + k when it verifies drafts) runs every token.
            width = inputs[0].shape[1]
            runs = self.device.eager_steps(decode_row=width <= max(1, self.verify_width))
            if runs:
                step = self.steps[key] = _EagerStep(self.model, runs, self.argmax)
        if step is not None and not step.due_for_compile:
            return step(*inputs)
        start = time.perf_counter()
        step = self.steps[key] = _CompiledStep(self.model, key, self.device.jit_options(), self.device.compiled_run,
                                               self.argmax)
        outputs = step(*inputs)
        outputs[1].asnumpy()  # count the compile apart from later runs
        self.compile_seconds += time.perf_counter() - start
        return outputs

    @property
    def compiled_shapes(self) -> set:
        """The input-shape buckets compiled so far (not those still run op by op)."""
        return {key for key, step in self.steps.items() if isinstance(step, _CompiledStep)}

    def serve(self) -> None:
        """The loop of a rank other than 0: run each step rank 0 sends, until it closes."""
        while (arrays := self.channel.receive()) is not None:
            self.forward([Tensor(a) for a in arrays])

    def close(self) -> None:
        """Rank 0: release the other ranks from serve(). Waits for a chained step's last ops."""
        if self.chained is not None:
            self.device.wait()
            self.chained = None
        if self.tp.rank == 0 and self.channel is not None:
            self.channel.close()
            self.channel = None

    def _record_prompt_logprobs(self, seqs, num_new, logits, width, wanted):
        for i, seq in enumerate(seqs):
            if not wanted[i]:
                continue
            if not seq.prompt_logprobs:
                seq.prompt_logprobs.append(None)  # the first prompt token has no prediction
            start = seq.num_cached_tokens
            # Token j is scored by the row of position j-1. A preempted request re-prefills its
            # prompt: tokens it already scored are skipped.
            first, last = max(start + 1, len(seq.prompt_logprobs)), min(start + num_new[i], seq.num_prompt_tokens - 1)
            if last < first:
                continue
            rows = Tensor(np.arange(i * width + first - 1 - start, i * width + last - start, dtype=np.int32))
            chosen = np.asarray(seq.token_ids[first: last + 1])
            n = seq.params.prompt_logprobs
            lp, top_ids, top_lp = topk_logprobs(logits[rows], n, chosen)
            for j, token in enumerate(chosen):
                seq.prompt_logprobs.append(_logprob_entry(int(token), float(lp[j]), top_ids[j][:n], top_lp[j][:n]))


def _drafts_sampled(seq: Sequence) -> bool:
    """Whether seq's drafts were drawn from a draft head's distribution (engine/drafter.py)."""
    return bool(seq.spec_token_ids) and len(seq.spec_probs) == len(seq.spec_token_ids)


def _sample_request(seq: Sequence) -> SampleRequest:
    """The sampler reads the token lists only for penalties and min_tokens: other requests' steps
    copy none."""
    p = seq.params
    if p.uses_penalties or p.min_tokens:
        return SampleRequest(p, seq.prompt_token_ids, seq.completion_token_ids, seq.rng)
    return SampleRequest(p, (), (), seq.rng)


# Fills the rows between the ones a step samples (greedy: no random draw, no penalties).
_PADDING_REQUEST = SampleRequest(SamplingParams(temperature=0.0), [], [], None)


def _logprob_entry(token: int, logprob: float, top_ids, top_logprobs) -> dict[int, float]:
    """vLLM's shape: {token id: logprob} with the chosen token and the top-k."""
    entry = {int(t): float(v) for t, v in zip(top_ids, top_logprobs)}
    entry[token] = logprob
    return entry
