"""EAGLE drafting in the batching engine (models/eagle.py is the head).

The head's step at position p reads token x_{p+1} and the target's hidden state at p, and
predicts x_{p+2}; its K/V live in its own paged cache, indexed by the sequence's block table from
the same block manager as the target's (so trim, preemption and abort cover it). Per engine step:

- catch_up, right after the target's step: the head runs over every position whose target
  hidden state the step made final (a prefill chunk's positions; a verify step's accepted ones),
  writing its cache there and drafting d_1 from the last of them, with the hidden state it returns.
- reserve, before scheduling: a decode sequence asks for up to k draft slots, d_1 and placeholders,
  so the scheduler allocates the blocks of the whole chain or drops it.
- extend, after scheduling: k - 1 one-token steps fill the placeholders, each reading the previous
  draft and the hidden state the head returned for it.

A greedy request's drafts are the head's arg-max, a point mass, which accept_chain verifies
exactly. A sampled request's (spec_decode.samples_drafts) are drawn from the head's distribution
q, processed like the target's, and verified by spec_decode.rejection_sample.
"""
from __future__ import annotations

import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from ..loader import checkpoint_files, load_checkpoint, _open
from ..models.eagle import DRAFT_TO_TARGET, HEADS, UNUSED_TENSORS, draft_config
from .runner import _CompiledStep, bucket, row_width
from .spec_decode import processed_probs, sample_from, samples_drafts


def _tensor_names(path: str) -> set[str]:
    names: set[str] = set()
    for file, indexed in checkpoint_files(path).items():
        with _open(file, indexed) as handle:
            names |= set(handle.keys())
    return names


def _read_tensor(path: str, name: str) -> np.ndarray:
    for file, indexed in checkpoint_files(path).items():
        with _open(file, indexed) as handle:
            if name in handle.keys():
                return handle.get_tensor(name)
    raise KeyError(name)


def build_draft(method: str, path: str, runner):
    """The head over the target's device, sharing the target's embedding and head when its
    checkpoint has none; and the draft -> target id offsets of a reduced vocabulary (or None)."""
    spec = draft_config(path, runner.model_cfg, method)
    names = _tensor_names(path)
    target, target_cfg = runner.model, runner.model_cfg
    own_embed = bool({"model.embed_tokens.weight", "embed_tokens.weight"} & names)
    own_head = "lm_head.weight" in names
    d2t = _read_tensor(path, DRAFT_TO_TARGET).astype(np.int64) if DRAFT_TO_TARGET in names else None
    targets = np.arange(len(d2t)) + d2t if d2t is not None else np.zeros(0)
    if ((targets < 0) | (targets >= target_cfg.vocab_size)).any():
        raise ValueError(f"{path}: {DRAFT_TO_TARGET} maps draft ids outside the target's vocabulary")
    head = HEADS[method]
    extra = {"num_aux": len(spec.aux_hidden_layers)} if spec.aux_hidden_layers else {}
    model = head(spec.cfg, runner.device, None if own_embed else target.embed_tokens,
                 None if own_head else target.lm_head, len(d2t) if d2t is not None else None,
                 1.0 if own_embed else spec.cfg.embedding_scale / target_cfg.embedding_scale, **extra)
    shared = tuple(n for n, _ in model.parameters_and_names()
                   if (n.startswith("embed_tokens.") and not own_embed) or (n.startswith("lm_head.") and not own_head))
    load_checkpoint(model, path, runner.cfg.dtype, progress=False,
                    skip=shared + head.UNUSED_TENSORS + UNUSED_TENSORS + (DRAFT_TO_TARGET,))
    return model, d2t


class EagleProposer:
    uses_target_hidden = True

    def __init__(self, cfg, runner):
        self.k = cfg.num_speculative_tokens
        self.runner = runner
        self.model, self.d2t = build_draft(cfg.method, cfg.model, runner)
        self.input_names = runner.device.step_input_names(self.model)
        self.hidden_size = runner.model_cfg.hidden_size
        self.steps: dict[tuple, _CompiledStep] = {}
        self.compile_seconds = 0.0
        draft_vocab = len(self.d2t) if self.d2t is not None else runner.model_cfg.vocab_size
        # The target id of each draft id, where a sampled draft's q goes in the target's vocabulary.
        self.target_ids = np.arange(draft_vocab) + (self.d2t if self.d2t is not None else 0)
        self.vocab_size = runner.model_cfg.vocab_size

    # -- the engine's three calls ----------------------------------------------------------
    def reserve(self, seq, limit: int) -> list[int]:
        """d_1 and placeholders for the rest of the chain (filled by extend)."""
        k = min(self.k, limit)
        if k < 1 or seq.draft_next is None:
            return []
        seq.spec_probs = [seq.draft_next_probs] if seq.draft_next_probs is not None else []
        return [seq.draft_next] * k

    def extend(self, batch) -> None:
        seqs = [s for s in batch.seqs if len(s.spec_token_ids) > 1]
        if not seqs:
            return
        rows = bucket(len(seqs))
        hidden = np.zeros((rows, 1, self.hidden_size), np.float32)
        hidden[:len(seqs), 0] = np.stack([s.draft_hidden for s in seqs])
        hidden = Tensor(hidden, self.runner.cfg.dtype)
        for j in range(1, max(len(s.spec_token_ids) for s in seqs)):
            # Draft d_j sits at position num_tokens - 2 + j (d_1 right after the last real token).
            chains = [([s.spec_token_ids[j - 1]], s.num_tokens - 2 + j, s.block_table)
                      if j < len(s.spec_token_ids) else None for s in seqs]
            logits, ids, out = self._step(chains, lambda r, w: hidden)
            hidden = out.reshape(rows, 1, self.hidden_size)
            drafting = [s if j < len(s.spec_token_ids) else None for s in seqs]
            for s, (token, q) in zip(drafting, self._draws(drafting, logits, ids)):
                if s is not None:
                    s.spec_token_ids[j] = token
                    if q is not None:
                        s.spec_probs.append(q)

    def catch_up(self, batch, sampled, target_hidden) -> None:
        """The head over the positions the target's step made final; drafts each sequence's d_1."""
        hidden, width = target_hidden
        chains, sources = [], []
        for i, (seq, n, tokens) in enumerate(zip(batch.seqs, batch.num_new_tokens, sampled)):
            if seq.is_finished:  # aborted while the step ran: its blocks are gone
                chains.append(None)
                continue
            tokens = [tokens] if isinstance(tokens, int) else tokens or []
            start = seq.num_cached_tokens
            valid = n - len(seq.spec_token_ids) + len(tokens) - 1 if tokens else n
            ids = seq.token_ids[start + 1:start + 1 + valid]
            ids += tokens[:valid - len(ids)]
            chains.append((ids, start, seq.block_table))
            sources.append((len(chains) - 1, i * width, valid))

        def gather(rows, w):
            index = np.zeros((rows, w), np.int32)
            for r, first, valid in sources:
                index[r, :valid] = np.arange(first, first + valid)
            return ops.gather(hidden, Tensor(index.reshape(-1)), 0).reshape(rows, w, -1)

        if not sources:
            return
        logits, ids, out = self._step(chains, gather)
        out = out.asnumpy()
        drafting = [batch.seqs[i] if chain is not None else None for i, chain in enumerate(chains)]
        for r, (seq, (token, q)) in enumerate(zip(drafting, self._draws(drafting, logits, ids))):
            if seq is not None:
                seq.draft_next, seq.draft_next_probs, seq.draft_hidden = token, q, out[r]

    def _draws(self, seqs, logits, greedy_ids) -> list[tuple[int, np.ndarray | None]]:
        """Each row's draft and, when sampled, the distribution q [target vocab] it came from."""
        sampled = [s is not None and samples_drafts(s.params) for s in seqs]
        rows = logits.asnumpy() if any(sampled) else None
        draws = []
        for i, seq in enumerate(seqs):
            if not sampled[i]:
                draws.append((int(greedy_ids[i]), None))
                continue
            q = np.zeros(self.vocab_size)
            q[self.target_ids] = processed_probs(rows[i], seq.params.temperature, seq.params.top_k)
            draws.append((sample_from(q, seq.rng), q))
        return draws

    # -- one step of the head --------------------------------------------------------------
    def _step(self, chains, hidden_for):
        """chains[i]: (token ids, first position, block table) of row i, or None (padding);
        hidden_for(rows, width) -> the hidden_states input. Returns each row's logits over the
        draft vocabulary, its draft (target ids) and the head's hidden states [rows, H]."""
        runner, bs = self.runner, self.runner.cfg.block_size
        real = [c for c in chains if c is not None]
        rows = bucket(len(chains))
        width = row_width([len(c[0]) for c in real], runner.verify_width)
        nb = runner._blocks_bucket(max(start + len(ids) for ids, start, _ in real))
        meta = {"input_ids": np.zeros((rows, width), np.int32),
                "positions": np.full((rows, width), -1, np.int32),
                "batch_valid_length": np.ones(rows, np.int32), "q_seq_lens": np.ones(rows, np.int32),
                "slot_mapping": np.full((rows, width), runner.pad_block * bs, np.int32),
                "block_tables": np.full((rows, nb), runner.pad_block, np.int32),
                "logits_rows": np.arange(rows, dtype=np.int32) * width}
        for i, chain in enumerate(chains):
            if chain is None:
                continue
            ids, start, table = chain
            n, table = len(ids), np.asarray(table, np.int32)
            pos = np.arange(start, start + n, dtype=np.int32)
            meta["input_ids"][i, :n] = ids
            meta["positions"][i, :n] = pos
            meta["slot_mapping"][i, :n] = table[pos // bs] * bs + pos % bs
            meta["block_tables"][i, :min(len(table), nb)] = table[:nb]
            meta["batch_valid_length"][i], meta["q_seq_lens"][i] = start + n, n
            meta["logits_rows"][i] = i * width + n - 1
        meta["slot_mapping"] = meta["slot_mapping"].reshape(-1)
        meta["hidden_states"] = hidden_for(rows, width)
        inputs = [meta[name] if isinstance(meta[name], Tensor) else ms.from_numpy(meta[name])
                  for name in self.input_names]
        logits, greedy, out = self._run(inputs)
        ids = greedy.asnumpy().astype(np.int64)
        if self.d2t is not None:
            ids = ids + self.d2t[ids]
        return logits, ids, out

    def _run(self, inputs):
        key = tuple(t.shape for t in inputs)
        step = self.steps.get(key)
        if step is not None:
            return step(*inputs)
        start = time.perf_counter()
        step = self.steps[key] = _CompiledStep(self.model, key, self.runner.device.jit_options())
        outputs = step(*inputs)
        outputs[1].asnumpy()
        self.compile_seconds += time.perf_counter() - start
        return outputs
