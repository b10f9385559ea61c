"""Next-token sampling on device: logits [N, V] in, token ids (and logprobs when asked) out.

All vocabulary-sized work runs in compiled graphs (``ms.jit``); the host builds per-row
parameter vectors, draws one uniform number per sampled request, and receives N ids.

Semantics (vLLM's, with the choices below spelled out so a reference can be written from them):

* Logprobs are ``log_softmax`` of the RAW logits (before penalties, bans and temperature).
* Processing order: repetition penalty (HF: for every token id present in prompt or output,
  ``logit / p`` if ``logit > 0`` else ``logit * p``), frequency penalty (``- f * count`` over
  output tokens), presence penalty (``- p`` if the token occurs in the output), then
  ``min_tokens`` (while ``len(output_ids) < min_tokens`` the EOS ids -- also with ``ignore_eos``,
  as vLLM's _all_stop_token_ids -- and ``stop_token_ids`` are set to -inf).
* ``temperature == 0``: greedy, the arg-max of the processed logits, ties to the lowest id.
* Otherwise ``x = logits / temperature`` and, on the probabilities ``softmax(x)``:
  top_k keeps the tokens whose value is >= the k-th largest value (ties with the k-th are kept;
  ``top_k`` 0 or >= V disables it); top_p, applied to the top_k-renormalised distribution, keeps
  a token iff the probability mass of the tokens strictly more likely than it is < top_p (the
  smallest set of most likely tokens reaching top_p, with ties at the edge kept; the top token
  is always kept; ``top_p == 1`` disables it); min_p keeps tokens with
  ``prob >= min_p * max prob``.  The kept set is ``{x >= threshold}`` for one per-row
  threshold, so the result does not depend on how a sort orders equal values.
* The sample is the inverse CDF of the renormalised kept distribution taken in token-id order:
  the smallest id ``i`` with ``cdf[i] > u * cdf[V-1]``, where ``u`` in ``[0, 1)`` is ONE uniform
  drawn from the request's own generator (so a seeded request is independent of its batch).

Cost model (2-core CPU, graph mode, V = 49152, measured): a full ``ops.sort``/``ops.topk(V)``
of [16, V] costs ~100 ms (~11 ms for one row), a 32-step bisection on thresholds as much, but
``ops.topk`` with K = 1024 costs ~5.5 ms (~1 ms for one row).  (``mint.sort`` has no CPU
kernel; ``ops.argsort`` is a full sort too.)  Thresholds for top_k / top_p are therefore read
off a top-K candidate list (K from CANDIDATE_K, > every row's top_k); a row whose top_p cut-off
lies beyond the K candidates (or whose k-th value has ties past K) is flagged by the graph and
the batch is re-run with the next K (finally K = V, an exact full sort), so results never
depend on K.  Rows without top_k/top_p need no candidate list at all.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import ops

from ..sampling import SamplingParams

# Candidate-list sizes for top_k / top_p thresholds (a batch uses the smallest that fits, then
# the next ones if a top_p cut-off falls beyond it; V itself is the exact last resort).
CANDIDATE_K = (1024, 8192)
# The number of top logprobs is padded up to one of these, so their graphs are few.
LOGPROB_K = (1, 5, 20)
# u is clamped below this so that u * total stays strictly below total in fp32.
_U_MAX = 1.0 - 2.0 ** -22

# Columns of the per-row parameter matrix handed to the generic graph.
_P_INV_T, _P_TOP_K, _P_TOP_P, _P_LOG_MIN_P, _P_U, _P_GREEDY, _P_REP = range(7)
_NUM_P = 7


def make_rng(params: SamplingParams) -> np.random.Generator:
    """The generator a request should own for its whole life (seeded from params.seed if set)."""
    return np.random.default_rng(params.seed)


@dataclass
class SampleRequest:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    # One per request, kept across steps (see make_rng): u is drawn from it once per sampled step.
    rng: np.random.Generator


@dataclass
class SampleOutput:
    token_ids: np.ndarray  # [n] int64
    logprobs: np.ndarray | None = None  # [n] float32, logprob (raw logits) of the sampled token
    top_ids: np.ndarray | None = None  # [n, k] int64, best first (ties: lower id first)
    top_logprobs: np.ndarray | None = None  # [n, k] float32


# --------------------------------------------------------------------------------------------
# Compiled graphs. One Python function object per static variant; ms.jit then compiles one
# graph per input shape (N comes in caller-chosen buckets, V is fixed).


@functools.lru_cache(maxsize=None)
def _argmax_fn():
    def argmax(x):
        return ops.argmax(x, dim=-1).astype(ms.int32)  # first maximal index: ties -> lowest id

    return ms.jit(argmax)


@functools.lru_cache(maxsize=None)
def _logprob_fn(k: int, with_chosen: bool):
    def logprobs(x, ids):
        lp = ops.log_softmax(x, axis=-1)
        top_v, top_i = ops.topk(lp, k, dim=-1, sorted=True)
        if with_chosen:
            chosen = ops.gather_elements(lp, 1, ids.reshape(-1, 1)).reshape(-1)
            return chosen, top_v, top_i
        return top_v, top_v, top_i

    return ms.jit(logprobs)


@functools.lru_cache(maxsize=None)
def _generic_fn(mods: bool, cand_k: int, vocab: int):
    """cand_k: 0 = no row uses top_k/top_p (no candidate list); vocab: V (for the K == V case)."""
    use_cand = cand_k > 0
    check_full = use_cand and cand_k < vocab
    if use_cand:
        col = ms.Tensor(np.arange(cand_k, dtype=np.float32).reshape(1, cand_k))

    def body(x, prm, present, bias):
        inv_t = prm[:, _P_INV_T:_P_INV_T + 1]
        top_k = prm[:, _P_TOP_K:_P_TOP_K + 1]
        top_p = prm[:, _P_TOP_P:_P_TOP_P + 1]
        log_min_p = prm[:, _P_LOG_MIN_P:_P_LOG_MIN_P + 1]
        u = prm[:, _P_U:_P_U + 1]
        greedy = prm[:, _P_GREEDY:_P_GREEDY + 1] > 0.5
        if mods:
            rep = prm[:, _P_REP:_P_REP + 1]
            x = ops.where(present, ops.where(x > 0, x / rep, x * rep), x) + bias
        xs = x * inv_t  # inv_t is 1 for greedy rows
        m = xs.max(axis=1, keepdims=True)
        probs = ops.softmax(xs, axis=-1)
        # min_p (log(min_p) is -inf when unset), or the max itself for greedy rows.
        thr = ops.where(greedy, m, m + log_min_p)
        flag = top_p < 0  # all False
        if use_cand:
            cv, ci = ops.topk(xs, cand_k, dim=-1, sorted=True)  # [N, K], values descending
            inf = ops.ones_like(cv) * float("inf")
            has_k = top_k > 0
            t_k = ops.where(col < top_k, cv, inf).min(axis=1, keepdims=True)
            t_k = ops.where(has_k, t_k, -inf[:, :1])
            cp = ops.gather_elements(probs, 1, ci) * (cv >= t_k).astype(ms.float32)
            # Mass of the top_k-kept set (all of it is among the candidates when top_k <= K).
            total = ops.where(has_k, cp.sum(axis=1, keepdims=True), probs.sum(axis=1, keepdims=True))
            excl = ops.cumsum(cp, axis=1) - cp  # mass strictly before each candidate
            n_keep = (excl < top_p * total).astype(ms.float32).sum(axis=1, keepdims=True)
            t_p = ops.where(col < n_keep, cv, inf).min(axis=1, keepdims=True)
            has_p = top_p < 1.0
            t_p = ops.where(has_p, t_p, -inf[:, :1])
            thr = ops.maximum(thr, ops.maximum(t_k, t_p))
            if check_full:
                last = cv[:, cand_k - 1:cand_k]
                # top_p cut-off not reached within K, or top_k ties may continue past K.
                flag = (has_p & (n_keep >= cand_k)) | (has_k & (last >= t_k))
        # x - thr >= 0 is x >= thr except that a -inf (banned) token is dropped even when thr is -inf.
        kept = probs * ((xs - thr) >= 0).astype(ms.float32)
        cdf = ops.cumsum(kept, axis=1)
        target = u * cdf[:, -1:]
        pos = ops.searchsorted(cdf, target, out_int32=True, right=True)  # #{i: cdf[i] <= target}
        pos = ops.minimum(pos, vocab - 1)
        return ops.concat([pos, flag.astype(ms.int32)], axis=1)

    if mods:
        def generic(x, prm, present, bias):
            return body(x, prm, present, bias)
    else:
        def generic(x, prm):
            return body(x, prm, None, None)
    return ms.jit(generic)


# --------------------------------------------------------------------------------------------


def _bucket(k: int, buckets) -> int:
    for b in buckets:
        if k <= b:
            return b
    return buckets[-1]


def topk_logprobs(logits: ms.Tensor, k: int, chosen_ids: np.ndarray | None = None):
    """Logprobs (log_softmax of ``logits`` [N, V]) of ``chosen_ids`` [N] and the top-k per row.

    Returns ``(chosen_logprobs [N] float32 or None, top_ids [N, k] int64, top_logprobs [N, k]
    float32)``.  k is at most 20 (padded to 1, 5 or 20 on device); ``k == 0`` gives [N, 0] arrays.
    One graph per (padded k, N): for prompt logprobs the caller should bucket N.
    The top-k come best first, equal logprobs ordered by lower id (which of several tokens tied
    at the k-th place get in is ops.topk's choice: deterministic, not necessarily the lowest id).
    """
    n = logits.shape[0]
    if not 0 <= k <= LOGPROB_K[-1]:
        raise ValueError(f"k must be in [0, {LOGPROB_K[-1]}], got {k}")
    kp = _bucket(max(k, 1), LOGPROB_K)
    kp = min(kp, logits.shape[1])
    if logits.dtype != ms.float32:
        logits = logits.astype(ms.float32)
    with_chosen = chosen_ids is not None
    ids = ms.Tensor(np.asarray(chosen_ids, dtype=np.int32).reshape(n) if with_chosen
                    else np.zeros(n, np.int32))
    chosen, top_v, top_i = _logprob_fn(kp, with_chosen)(logits, ids)
    top_v = top_v.asnumpy()
    top_i = top_i.asnumpy().astype(np.int64)
    # Best first, ties by lower id (ops.topk's order among equal values is its own).
    order = np.lexsort((top_i, -top_v), axis=1)
    top_v = np.take_along_axis(top_v, order, 1)[:, :k]
    top_i = np.take_along_axis(top_i, order, 1)[:, :k]
    return (chosen.asnumpy() if with_chosen else None), top_i, top_v


class Sampler:
    """``Sampler(eos_token_ids)(logits [N, V], requests, num_logprobs) -> SampleOutput``.

    ``requests`` may be shorter than N (padding rows are ignored); outputs have len(requests)
    rows.  ``num_logprobs``: how many top logprobs to return per row (the batch's largest
    ``params.logprobs``); pass -1 or None when no request asked for logprobs.  With 0 only the
    sampled token's logprob is returned (top arrays are [n, 0]).
    """

    def __init__(self, eos_token_ids: int | list[int] | tuple[int, ...] | None = None):
        if eos_token_ids is None:
            eos_token_ids = []
        elif isinstance(eos_token_ids, (int, np.integer)):
            eos_token_ids = [eos_token_ids]
        self.eos_token_ids = [int(t) for t in eos_token_ids]

    # -- host-side helpers ------------------------------------------------------------------

    def _banned(self, req: SampleRequest) -> list[int]:
        p = req.params
        if len(req.output_ids) >= p.min_tokens:
            return []
        return list(p.stop_token_ids or []) + self.eos_token_ids

    def _mods(self, requests, banned, n_rows: int, vocab: int):
        """present [N, V] bool (prompt or output, for the repetition penalty) and bias [N, V]
        float32 (-freq*count - presence*[count>0], -inf for banned ids)."""
        present = np.zeros((n_rows, vocab), dtype=np.bool_)
        bias = np.zeros((n_rows, vocab), dtype=np.float32)
        for i, req in enumerate(requests):
            p = req.params
            if p.uses_penalties:
                out = np.asarray(req.output_ids, dtype=np.int64)
                counts = np.bincount(out[(out >= 0) & (out < vocab)], minlength=vocab)[:vocab]
                if p.repetition_penalty != 1.0:
                    prompt = np.asarray(req.prompt_ids, dtype=np.int64)
                    present[i, prompt[(prompt >= 0) & (prompt < vocab)]] = True
                    present[i] |= counts > 0
                if p.frequency_penalty != 0.0:
                    bias[i] -= np.float32(p.frequency_penalty) * counts.astype(np.float32)
                if p.presence_penalty != 0.0:
                    bias[i] -= np.float32(p.presence_penalty) * (counts > 0)
            if banned[i]:
                ids = np.asarray(banned[i], dtype=np.int64)
                bias[i, ids[(ids >= 0) & (ids < vocab)]] = -np.inf
        return ms.Tensor(present), ms.Tensor(bias)

    # -- main entry ---------------------------------------------------------------------------

    def __call__(self, logits: ms.Tensor, requests: list[SampleRequest],
                 num_logprobs: int | None = -1, argmax_ids: ms.Tensor | None = None) -> SampleOutput:
        """argmax_ids: the rows' arg-max when the caller's graph already computed it (ties to
        the lowest id, as here); a greedy batch without penalties or bans then uses it."""
        n_rows, vocab = logits.shape
        n = len(requests)
        if n > n_rows:
            raise ValueError(f"{n} requests for {n_rows} rows of logits")
        if logits.dtype != ms.float32:
            logits = logits.astype(ms.float32)
        banned = [self._banned(r) for r in requests]
        mods = any(r.params.uses_penalties for r in requests) or any(banned)
        greedy = [r.params.temperature == 0.0 for r in requests]

        if all(greedy) and not mods:
            ids = argmax_ids if argmax_ids is not None else _argmax_fn()(logits)
            token_ids = ids.asnumpy().reshape(-1)[:n].astype(np.int64)  # [N] or [N, 1]
        else:
            token_ids = self._generic(logits, requests, banned, greedy, mods, n_rows, vocab)

        out = SampleOutput(token_ids=token_ids)
        if num_logprobs is not None and num_logprobs >= 0:
            chosen = np.zeros(n_rows, np.int64)
            chosen[:n] = token_ids
            lp, top_i, top_v = topk_logprobs(logits, min(int(num_logprobs), vocab), chosen)
            out.logprobs, out.top_ids, out.top_logprobs = lp[:n], top_i[:n], top_v[:n]
        return out

    def _generic(self, logits, requests, banned, greedy, mods, n_rows, vocab) -> np.ndarray:
        prm = np.zeros((n_rows, _NUM_P), dtype=np.float32)
        prm[:, _P_INV_T] = 1.0
        prm[:, _P_TOP_P] = 1.0
        prm[:, _P_LOG_MIN_P] = -np.inf
        prm[:, _P_GREEDY] = 1.0  # padding rows: greedy
        prm[:, _P_REP] = 1.0
        max_k, any_p = 0, False
        for i, req in enumerate(requests):
            p = req.params
            prm[i, _P_REP] = p.repetition_penalty
            if greedy[i]:
                continue
            prm[i, _P_GREEDY] = 0.0
            prm[i, _P_INV_T] = 1.0 / p.temperature
            if 0 < p.top_k < vocab:
                prm[i, _P_TOP_K] = p.top_k
                max_k = max(max_k, p.top_k)
            if p.top_p < 1.0:
                prm[i, _P_TOP_P] = p.top_p
                any_p = True
            if p.min_p > 0.0:
                prm[i, _P_LOG_MIN_P] = math.log(p.min_p)
            prm[i, _P_U] = min(float(req.rng.random()), _U_MAX)

        args = [logits, ms.Tensor(prm)]
        if mods:
            args += list(self._mods(requests, banned, n_rows, vocab))
        if not (max_k or any_p):
            res = _generic_fn(mods, 0, vocab)(*args).asnumpy()
            return res[:len(requests), 0].astype(np.int64)
        # K > max top_k: with K == top_k the k-th value is the last candidate and would be
        # flagged as "ties may continue past K".
        ks = [k for k in CANDIDATE_K if max_k < k < vocab] + [vocab]
        for cand_k in ks:
            res = _generic_fn(mods, cand_k, vocab)(*args).asnumpy()
            if not res[:, 1].any():
                break
        return res[:len(requests), 0].astype(np.int64)
