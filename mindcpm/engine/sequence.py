"""A request's state as the engine sees it: token ids and the KV blocks that hold them."""
from __future__ import annotations

from enum import Enum, auto
from itertools import count

from ..sampling import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    _ids = count()

    def __init__(self, token_ids: list[int], params: SamplingParams, block_size: int):
        self.seq_id = next(Sequence._ids)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        # Tokens whose K/V are already written to the cache. The tokens from here on are
        # what the next step computes: a prompt chunk in prefill, the last token in decode.
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        # Provisional tokens to verify in the next decode step (speculative decoding): never in
        # token_ids, so never hashed into the prefix cache, until the target accepts them.
        self.spec_token_ids: list[int] = []
        # Decode steps to skip drafting, after chains the model rejected outright (spec_decode.DraftBackoff).
        self.spec_skip_steps = 0
        self.spec_backoff = 0
        # An EAGLE head's next draft and the hidden state it returned with it (engine/drafter.py).
        self.draft_next: int | None = None
        self.draft_hidden = None
        self.draft_next_probs = None  # q of draft_next when the head samples it (spec_decode.samples_drafts)
        # q [V] of each of spec_token_ids when they were sampled from a draft head, else empty.
        self.spec_probs: list = []
        # Linear-attention state slot (MiniMax), held from allocation to deallocation with the blocks.
        self.state_slot: int | None = None
        self.block_size = block_size
        self.params = params
        self.rng = None  # the request's own np.random.Generator, so its samples ignore batching
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        # Filled by the runner when asked for: per generated token (logprob, top ids, top logprobs).
        self.logprobs: list = []
        self.prompt_logprobs: list = []

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_blocks(self) -> int:
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    def block(self, i: int) -> list[int]:
        """Token ids that belong to the i-th logical block."""
        return self.token_ids[i * self.block_size: (i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))
