"""Paged KV-cache bookkeeping: which physical blocks each sequence holds, and prefix sharing.

Models with linear attention (MiniMax) also hold one state slot per sequence: taken with the
sequence's first blocks and freed with them (finish, abort, preemption). Such a state sums the
whole prefix, so it cannot be shared: prefix caching must be off for these models.

A block's K/V are written only at positions >= its sequence's num_cached_tokens, so a block
that is full of computed tokens never changes again. Only such blocks are registered under a
content hash, and a prefix-cache hit always ends on a block boundary, so a sequence never
writes into a block it shares with another.
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from .sequence import Sequence


def block_hash(prefix_hash: bytes, token_ids: list[int]) -> bytes:
    """Hash of a full block chained over everything before it, so equal hashes mean equal prefixes."""
    return hashlib.sha256(prefix_hash + array("q", token_ids).tobytes()).digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    # Set only while this block is the registered holder of `hash`; the token ids make a
    # hit exact rather than trusting the hash alone.
    hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_state_slots: int = 0):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        if num_state_slots and enable_prefix_caching:
            raise ValueError("prefix caching cannot be used with linear-attention state slots")
        self.num_state_slots = num_state_slots
        self._free_slots: list[int] = list(range(num_state_slots - 1, -1, -1))
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion-ordered set: blocks freed longest ago are handed out first, so recently
        # freed cached prefixes survive longest.
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))
        self._hash_to_block: dict[bytes, int] = {}
        # Chained hashes of each sequence's computed full blocks, to extend the chain cheaply.
        self._seq_hashes: dict[int, list[bytes]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_free_state_slots(self) -> int:
        return len(self._free_slots)

    def can_allocate(self, seq: Sequence) -> bool:
        if self.num_state_slots and not self._free_slots:
            return False
        hits = self._cached_prefix(seq)
        shared_in_use = sum(1 for block_id, _ in hits if self.blocks[block_id].ref_count > 0)
        return seq.num_blocks - shared_in_use <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its tokens, reusing cached full blocks of its prefix."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        hits = self._cached_prefix(seq)
        for block_id, _ in hits:
            self._take(block_id)
        seq.block_table = [block_id for block_id, _ in hits]
        seq.block_table += [self._take_fresh() for _ in range(seq.num_blocks - len(hits))]
        seq.num_cached_tokens = len(hits) * self.block_size
        if self.num_state_slots:
            seq.state_slot = self._free_slots.pop()
        if self.enable_prefix_caching:
            self._seq_hashes[seq.seq_id] = [h for _, h in hits]

    def deallocate(self, seq: Sequence) -> None:
        # Tail blocks go on the free list first, so they are evicted before the shared head.
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_cached_tokens = 0
        if seq.state_slot is not None:
            self._free_slots.append(seq.state_slot)
            seq.state_slot = None
        self._seq_hashes.pop(seq.seq_id, None)

    def _blocks_with_lookahead(self, seq: Sequence, lookahead: int) -> int:
        return (seq.num_tokens + lookahead + self.block_size - 1) // self.block_size

    def can_append(self, seq: Sequence, lookahead: int = 0) -> bool:
        """Whether free blocks cover `seq`'s tokens plus `lookahead` provisional (draft) tokens."""
        return self._blocks_with_lookahead(seq, lookahead) - len(seq.block_table) <= self.num_free_blocks

    def may_append(self, seq: Sequence, lookahead: int = 0) -> None:
        """Make the block table cover all of `seq`'s tokens and `lookahead` draft tokens (before a
        decode step)."""
        needed = self._blocks_with_lookahead(seq, lookahead) - len(seq.block_table)
        seq.block_table += [self._take_fresh() for _ in range(needed)]

    def reserve_next_slot(self, seq: Sequence) -> bool:
        """Make the block table cover the token after `seq`'s last one, if a block is free: the
        block the next decode step's may_append would take, taken a step early (a chained decode
        step, engine/runner.py, writes that slot before its token is appended)."""
        if not self.can_append(seq, 1):
            return False
        self.may_append(seq, 1)
        return True

    def trim(self, seq: Sequence) -> None:
        """Free the tail blocks that only held rejected draft tokens. They were never registered:
        registration covers computed tokens of token_ids only."""
        while len(seq.block_table) > seq.num_blocks:
            self._release(seq.block_table.pop())

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Register the hashes of `seq`'s blocks that are now full of computed tokens.

        Called after a step, not in may_append: a block is shareable only once its K/V are
        written, and a block that fills up at a sampled token is written a step later.
        """
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        # Accepted draft tokens are computed before they are appended to token_ids.
        for i in range(len(hashes), min(seq.num_cached_tokens, seq.num_tokens) // self.block_size):
            token_ids = seq.block(i)
            h = block_hash(hashes[-1] if hashes else b"", token_ids)
            hashes.append(h)
            # If another block already holds this content, keep that one registered.
            if h not in self._hash_to_block:
                block = self.blocks[seq.block_table[i]]
                block.hash, block.token_ids = h, tuple(token_ids)
                self._hash_to_block[h] = block.block_id

    def _cached_prefix(self, seq: Sequence) -> list[tuple[int, bytes]]:
        """(block id, hash) of the registered blocks matching `seq`'s leading full blocks.

        Stops one token short of the whole sequence: the last token must be computed to get
        its logits, and rounding down to whole blocks keeps its block private. A request
        for prompt logprobs gets no hits: cached tokens would skip their logits.
        """
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        hits: list[tuple[int, bytes]] = []
        prefix_hash = b""
        for i in range((seq.num_tokens - 1) // self.block_size):
            token_ids = seq.block(i)
            prefix_hash = block_hash(prefix_hash, token_ids)
            block_id = self._hash_to_block.get(prefix_hash)
            if block_id is None or self.blocks[block_id].token_ids != tuple(token_ids):
                break
            hits.append((block_id, prefix_hash))
        return hits

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        """A free block for new content; its old cached content, if any, is forgotten."""
        if not self._free:
            raise RuntimeError("no free KV blocks: check can_allocate/can_append first")
        block_id = next(iter(self._free))
        block = self.blocks[block_id]
        if block.hash is not None:
            del self._hash_to_block[block.hash]
            block.hash, block.token_ids = None, None
        self._take(block_id)
        return block_id
