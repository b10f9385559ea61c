"""Speculative decoding: draft proposers and the acceptance rule of a verified chain.

A sequence with draft tokens d_1..d_k is verified in one target step: its row computes the last
real token and the k drafts (1 + k query tokens over the paged cache), and the target samples a
token t_j at every one of those positions. Draft d_j is accepted while t_j == d_j; the first
mismatch t_j (or, when all k are accepted, the bonus token t_{k+1}) ends the run.

For a draft that is a point mass (n-gram: q(d) = 1) this IS the standard rejection sampler:
accepting d with probability min(1, p(d)/q(d)) = p(d) happens exactly when a sample t ~ p equals
d, and a t != d is distributed as p with d removed and renormalised, the residual
norm(max(0, p - q)). So each row is sampled by the ordinary sampler (greedy: the arg-max), and the
output distribution is the target's token for token.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..sampling import SamplingParams

METHODS = ("ngram", "eagle", "eagle3")
DRAFT_MODEL_METHODS = ("eagle", "eagle3")  # methods whose drafts come from a draft model directory


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's speculative_config keys (the n-gram and EAGLE subset)."""
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None  # the draft model's directory (eagle, eagle3)

    @property
    def uses_draft_model(self) -> bool:
        return self.method in DRAFT_MODEL_METHODS

    @classmethod
    def from_dict(cls, d: dict | None) -> SpeculativeConfig | None:
        if not d:
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config key {unknown[0]!r}; known: {', '.join(sorted(known))}")
        if "method" not in d or "num_speculative_tokens" not in d:
            raise ValueError("speculative_config needs 'method' and 'num_speculative_tokens'")
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown speculative method {self.method!r}; choose {', '.join(METHODS)}")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {self.num_speculative_tokens!r}")
        if self.uses_draft_model and not self.model:
            raise ValueError(f"speculative method {self.method!r} needs 'model': the draft model's directory")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")


def make_proposer(cfg: SpeculativeConfig | None, runner):
    """The engine's drafter for `cfg` (None: no speculation)."""
    if cfg is None:
        return None
    if cfg.uses_draft_model:
        from .drafter import EagleProposer
        return EagleProposer(cfg, runner)
    return NgramProposer(cfg)


class NgramProposer:
    """Prompt lookup (vLLM's "ngram"): find the longest suffix of the sequence, between min_n and
    max_n tokens, that occurred earlier in it; propose the (up to) k tokens that followed its
    earliest occurrence."""

    def __init__(self, cfg: SpeculativeConfig):
        self.min_n, self.max_n, self.k = cfg.prompt_lookup_min, cfg.prompt_lookup_max, cfg.num_speculative_tokens

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        k = min(self.k, limit)
        if k < 1 or len(token_ids) <= self.min_n:
            return []
        tokens = np.asarray(token_ids, np.int64)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            # Windows that start before the suffix itself: tokens[i:i+n] for i < len - n.
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[0]) + n
                return tokens[start:start + k].tolist()
        return []


# A chain rejected outright cost a verify step (1 + k tokens) for one token. After such a chain a
# sequence skips drafting for 1, 2, 4, ... up to this many decode steps (reset by any accepted
# draft), so text the drafts cannot predict pays a verify step at most once per this many steps.
MAX_DRAFT_BACKOFF = 32


def record_outcome(seq, num_accepted: int) -> None:
    """Backs off drafting for `seq` after a fully rejected chain; any accepted draft resets it."""
    if num_accepted:
        seq.spec_backoff = 0
        return
    seq.spec_backoff = min(2 * seq.spec_backoff or 1, MAX_DRAFT_BACKOFF)
    seq.spec_skip_steps = seq.spec_backoff


def wants_draft(seq) -> bool:
    """Whether `seq` drafts this step (counts down a backoff)."""
    if seq.spec_skip_steps:
        seq.spec_skip_steps -= 1
        return False
    return True


def can_speculate(params: SamplingParams, num_completion_tokens: int) -> bool:
    """Whether a request's verify rows may be sampled independently of each other's outcome: not
    with penalties (they read the output so far), logprobs, or min_tokens bans still active."""
    return (not params.uses_penalties and params.logprobs is None and params.prompt_logprobs is None
            and num_completion_tokens >= params.min_tokens)


def accept_chain(drafts: list[int], targets) -> list[int]:
    """The tokens a verified chain appends: the drafts up to the first that differs from the
    target's token at its position, then the target's token there (or the bonus token)."""
    a = 0
    while a < len(drafts) and int(targets[a]) == drafts[a]:
        a += 1
    return drafts[:a] + [int(targets[a])]


def samples_drafts(params: SamplingParams) -> bool:
    """Whether a draft head samples this request's drafts from its own distribution q (verified by
    rejection_sample) rather than proposing its arg-max (a point mass, verified by accept_chain):
    temperature and top_k are supported; top_p / min_p requests keep the point mass."""
    return params.temperature > 0 and params.top_p >= 1.0 and params.min_p == 0.0


def processed_probs(logits: np.ndarray, temperature: float, top_k: int = 0) -> np.ndarray:
    """softmax(logits / temperature) over the tokens at or above the k-th largest value (the
    sampler's temperature and top_k, engine/sampler.py), in float64; rows are the last axis."""
    x = np.asarray(logits, np.float64) / temperature
    if 0 < top_k < x.shape[-1]:
        kth = np.partition(x, -top_k, axis=-1)[..., -top_k, None]
        x = np.where(x >= kth, x, -np.inf)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sample_from(weights: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse CDF in token-id order of non-negative weights."""
    cdf = np.cumsum(weights)
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)


def rejection_sample(p: np.ndarray, q: np.ndarray, drafts: list[int], rng: np.random.Generator) -> list[int]:
    """The standard speculative rejection sampler: p [k+1, V] the target's distributions at the
    chain's positions, q [k, V] the ones the drafts were drawn from. Draft d_j is accepted with
    probability min(1, p_j(d) / q_j(d)); the first rejected one is replaced by a sample of
    norm(max(0, p_j - q_j)); when all are accepted a bonus token is drawn from p_k. The tokens
    appended are then distributed exactly as the target's own samples."""
    for j, d in enumerate(drafts):
        if rng.random() * q[j, d] < p[j, d]:
            continue
        residual = np.maximum(p[j] - q[j], 0.0)
        # residual == 0 only when p_j == q_j, where every draft is accepted: kept for rounding.
        return drafts[:j] + [sample_from(residual if residual.sum() > 0 else p[j], rng)]
    return drafts + [sample_from(p[len(drafts)], rng)]


def verify_sampled_chain(seq, target_logits: np.ndarray) -> list[int]:
    """The tokens a chain of drafts sampled from q (seq.spec_probs) appends, by rejection_sample."""
    params = seq.params
    p = processed_probs(target_logits, params.temperature, params.top_k)
    return rejection_sample(p, np.stack(seq.spec_probs), seq.spec_token_ids, seq.rng)


@dataclass
class SpecStats:
    """Draft tokens proposed / accepted, and verified chains (vLLM's acceptance metrics)."""
    num_drafts: int = 0  # chains verified
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify step yields per chain: the accepted drafts plus the target's own token."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


def speculative_stats(engine) -> dict:
    """vLLM's acceptance metrics, when the engine drafts tokens."""
    if engine.proposer is None:
        return {}
    s = engine.spec_stats
    return {"spec_draft_tokens": s.num_draft_tokens, "spec_accepted_tokens": s.num_accepted_tokens,
            "spec_acceptance_rate": round(s.acceptance_rate, 4),
            "spec_mean_accepted_length": round(s.mean_accepted_length, 3)}
