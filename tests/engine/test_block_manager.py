import pytest

from mindcpm.engine import block_manager as block_manager_module
from mindcpm.engine.block_manager import BlockManager
from mindcpm.engine.sequence import Sequence
from mindcpm.sampling import SamplingParams

BLOCK_SIZE = 4


def make_seq(token_ids):
    return Sequence(token_ids, SamplingParams(), BLOCK_SIZE)


def prefill(manager, seq):
    """Allocate and pretend a step computed every token, as the scheduler would record it."""
    manager.allocate(seq)
    seq.num_cached_tokens = seq.num_tokens
    manager.register_computed_blocks(seq)


def ref_counts(manager):
    return [block.ref_count for block in manager.blocks]


def test_allocate_and_deallocate_account_for_every_block():
    manager = BlockManager(num_blocks=5, block_size=BLOCK_SIZE)
    seq = make_seq(list(range(9)))  # 3 blocks: 4 + 4 + 1
    assert manager.can_allocate(seq)
    manager.allocate(seq)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert seq.num_cached_tokens == 0
    assert manager.num_free_blocks == 2
    assert sorted(ref_counts(manager)) == [0, 0, 1, 1, 1]

    manager.deallocate(seq)
    assert seq.block_table == [] and seq.num_cached_tokens == 0
    assert manager.num_free_blocks == 5
    assert ref_counts(manager) == [0] * 5


def test_can_allocate_counts_blocks_needed():
    manager = BlockManager(num_blocks=2, block_size=BLOCK_SIZE)
    assert manager.can_allocate(make_seq(list(range(8))))
    assert not manager.can_allocate(make_seq(list(range(9))))


def test_prefix_hit_shares_full_blocks_and_sets_cached_tokens():
    manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    prefill(manager, first)  # blocks [1..4] and [5..8] are full and computed; [9, 10] is not
    second = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 42, 43, 44])
    free_before = manager.num_free_blocks
    assert manager.can_allocate(second)
    manager.allocate(second)
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] not in first.block_table
    assert second.num_cached_tokens == 8
    assert manager.num_free_blocks == free_before - 1  # only the third block is new
    assert [manager.blocks[b].ref_count for b in second.block_table] == [2, 2, 1]


def test_hit_never_covers_the_whole_sequence():
    manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    prefill(manager, make_seq(list(range(1, 13))))  # three full computed blocks

    exact_blocks = make_seq(list(range(1, 9)))  # all of its 2 blocks are cached
    manager.allocate(exact_blocks)
    # The last token must be computed; rounding to whole blocks gives 4, not 7, so the
    # block it writes into is its own.
    assert exact_blocks.num_cached_tokens == 4
    assert manager.blocks[exact_blocks.block_table[1]].ref_count == 1

    one_more = make_seq(list(range(1, 10)))
    manager.allocate(one_more)
    assert one_more.num_cached_tokens == 8

    single_token = make_seq([1])
    manager.allocate(single_token)
    assert single_token.num_cached_tokens == 0


def test_only_computed_full_blocks_are_shared():
    manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    first = make_seq(list(range(1, 11)))
    manager.allocate(first)
    first.num_cached_tokens = 6  # a chunked prefill got as far as the middle of block 1
    manager.register_computed_blocks(first)

    second = make_seq(list(range(1, 11)))
    manager.allocate(second)
    assert second.num_cached_tokens == 4
    assert second.block_table[0] == first.block_table[0]
    assert second.block_table[1] != first.block_table[1]


def test_same_block_after_a_different_prefix_is_not_a_hit():
    manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    prefill(manager, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])
    manager.allocate(other)
    assert other.num_cached_tokens == 0


def test_prompt_logprobs_request_gets_no_hits():
    manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    prefill(manager, make_seq([1, 2, 3, 4, 5]))
    wants_prompt_logprobs = Sequence([1, 2, 3, 4, 5], SamplingParams(prompt_logprobs=1), BLOCK_SIZE)
    manager.allocate(wants_prompt_logprobs)
    assert wants_prompt_logprobs.num_cached_tokens == 0


def test_hash_collision_is_not_a_hit(monkeypatch):
    monkeypatch.setattr(block_manager_module, "block_hash", lambda prefix_hash, token_ids: b"same")
    manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    prefill(manager, make_seq([1, 2, 3, 4, 5]))
    other = make_seq([9, 9, 9, 9, 5])
    manager.allocate(other)
    assert other.num_cached_tokens == 0
    same = make_seq([1, 2, 3, 4, 5])
    manager.allocate(same)
    assert same.num_cached_tokens == 4


def test_freed_cached_block_is_reusable_until_handed_out():
    manager = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    prefill(manager, first)
    cached_block_ids = first.block_table[:2]
    manager.deallocate(first)
    assert manager.num_free_blocks == 3

    again = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert manager.can_allocate(again)
    manager.allocate(again)
    assert again.block_table[:2] == cached_block_ids
    assert again.num_cached_tokens == 8
    manager.deallocate(again)
    assert manager.num_free_blocks == 3


def test_evicted_block_is_no_longer_a_hit():
    manager = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    first = make_seq([1, 2, 3, 4, 5])
    prefill(manager, first)
    manager.deallocate(first)
    filler = make_seq([50 + i for i in range(12)])
    manager.allocate(filler)
    manager.deallocate(filler)

    again = make_seq([1, 2, 3, 4, 5])
    manager.allocate(again)
    assert again.num_cached_tokens == 0


def test_evicting_a_block_forgets_its_content_even_if_refilled_alike():
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    prefill(manager, first)
    first_blocks = first.block_table
    manager.deallocate(first)  # free order: the unused block, then first's blocks tail first
    # Takes every block but first's head; first's second block now holds [5, 6, 7, 8] after
    # another prefix.
    other = make_seq([0, 0, 0, 0, 0, 0, 0, 0, 5, 6, 7, 8])
    prefill(manager, other)
    assert other.block_table[2] == first_blocks[1] and first_blocks[0] not in other.block_table
    manager.deallocate(other)

    again = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    manager.allocate(again)
    assert again.num_cached_tokens == 4
    assert again.block_table[0] == first_blocks[0]


def test_hit_on_free_blocks_counts_them_against_free_space():
    manager = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    prefill(manager, first)
    manager.deallocate(first)
    # Two free cached blocks are hit, the third is fresh: exactly the whole pool.
    assert manager.can_allocate(make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))
    assert not manager.can_allocate(make_seq(list(range(1, 14))))


def test_hit_on_blocks_in_use_needs_no_free_space_for_them():
    manager = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    prefill(manager, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert manager.num_free_blocks == 0
    assert not manager.can_allocate(make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))

    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    prefill(manager, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    sharer = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert manager.can_allocate(sharer)
    manager.allocate(sharer)
    assert manager.num_free_blocks == 0


def test_prefix_caching_disabled_never_hits():
    manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    prefill(manager, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    again = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    manager.allocate(again)
    assert again.num_cached_tokens == 0
    assert manager.num_free_blocks == 10 - 6


def test_append_adds_a_block_only_when_the_last_one_is_full():
    manager = BlockManager(num_blocks=2, block_size=BLOCK_SIZE)
    seq = make_seq([1, 2, 3])
    prefill(manager, seq)
    seq.append_token(4)
    assert manager.can_append(seq)
    manager.may_append(seq)
    assert len(seq.block_table) == 1

    seq.append_token(5)
    assert manager.can_append(seq)
    manager.may_append(seq)
    assert len(seq.block_table) == 2 and manager.num_free_blocks == 0

    for token in (6, 7, 8, 9):
        seq.append_token(token)
    assert not manager.can_append(seq)


def test_reserving_the_next_slot_takes_the_block_the_next_append_would():
    manager = BlockManager(num_blocks=2, block_size=BLOCK_SIZE)
    seq = make_seq([1, 2, 3])
    prefill(manager, seq)
    assert manager.reserve_next_slot(seq) and len(seq.block_table) == 1  # token 4 fits block 0
    seq.append_token(4)
    assert manager.reserve_next_slot(seq) and len(seq.block_table) == 2  # token 5 starts block 1
    seq.append_token(5)
    manager.may_append(seq)
    assert len(seq.block_table) == 2 and manager.num_free_blocks == 0  # the append takes nothing more
    for token in (6, 7, 8):
        seq.append_token(token)
    assert not manager.reserve_next_slot(seq) and len(seq.block_table) == 2  # no block is free
    manager.deallocate(seq)
    assert manager.num_free_blocks == 2


def test_decoded_block_is_registered_once_its_last_token_is_computed():
    manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    seq = make_seq([1, 2, 3])
    prefill(manager, seq)
    seq.append_token(4)  # block 0 is full of tokens, but token 4 has no K/V yet
    manager.may_append(seq)
    manager.register_computed_blocks(seq)
    assert manager.can_allocate(probe := make_seq([1, 2, 3, 4, 5]))
    manager.allocate(probe)
    assert probe.num_cached_tokens == 0
    manager.deallocate(probe)

    seq.num_cached_tokens = 4  # the decode step wrote token 4
    manager.register_computed_blocks(seq)
    probe = make_seq([1, 2, 3, 4, 5])
    manager.allocate(probe)
    assert probe.num_cached_tokens == 4
    assert probe.block_table[0] == seq.block_table[0]


def test_taking_a_block_from_an_empty_pool_is_a_clear_error():
    manager = BlockManager(num_blocks=1, block_size=BLOCK_SIZE)
    with pytest.raises(RuntimeError, match="no free KV blocks"):
        manager.allocate(make_seq(list(range(5))))
