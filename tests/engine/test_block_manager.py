"""BlockManager: exact block ids, prefix reuse, the last-token rule, LRU revival and eviction."""

from __future__ import annotations

import pytest

from lmserve.engine.block_manager import RELEASED, BlockManager, hash_block_tokens
from lmserve.engine.request import Request
from lmserve.types import SamplingParams


def make_request(request_id: str, token_ids: list[int], max_tokens: int = 16) -> Request:
    return Request(request_id, token_ids, SamplingParams(max_tokens=max_tokens))


def compute_all(bm: BlockManager, req: Request) -> None:
    """What a forward over the whole request does: every token's KV written, then registered."""
    req.num_computed_tokens = req.num_tokens
    bm.cache_computed_blocks(req)
    bm.check_invariants()


PREFIX = list(range(100, 108))  # two full blocks of 4


def test_fresh_pool_hands_out_lowest_blocks_in_order() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    req = make_request("a", list(range(10)))
    assert bm.can_allocate(req)
    bm.allocate(req)
    bm.check_invariants()
    assert req.block_ids == [0, 1, 2]
    assert req.num_computed_tokens == 0
    assert req.num_cached_tokens == 0
    assert bm.num_free_blocks == 5
    assert bm.num_used_blocks == 3
    assert (bm.num_blocks, bm.block_size) == (8, 4)


def test_second_request_reuses_computed_shared_prefix() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_request("a", PREFIX + [1, 2])
    bm.allocate(first)
    compute_all(bm, first)  # blocks 0 and 1 are full and registered; block 2 is partial
    assert bm.num_cached_blocks == 2

    second = make_request("b", PREFIX + [7, 7, 7, 7])
    assert bm.can_allocate(second)
    bm.allocate(second)
    bm.check_invariants()
    assert second.block_ids == [0, 1, 3]
    assert second.num_computed_tokens == 8
    assert second.num_cached_tokens == 8
    assert bm.num_free_blocks == 4  # blocks 0 and 1 are shared, not taken twice
    assert bm.num_prefix_queries == 10 + 12
    assert bm.num_prefix_hits == 8


def test_blocks_are_not_reused_before_their_kv_is_written() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_request("a", PREFIX + [1, 2])
    bm.allocate(first)
    bm.cache_computed_blocks(first)  # nothing computed yet: nothing registered
    second = make_request("b", PREFIX + [7])
    bm.allocate(second)
    assert second.block_ids == [3, 4, 5]
    assert second.num_computed_tokens == 0

    # Half computed: only the first block is complete, so only it can be shared.
    first.num_computed_tokens = 6
    bm.cache_computed_blocks(first)
    third = make_request("c", PREFIX + [7])
    bm.allocate(third)
    bm.check_invariants()
    assert third.block_ids == [0, 6, 7]
    assert third.num_computed_tokens == 4


def test_last_token_block_is_never_a_hit() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_request("a", list(PREFIX))
    bm.allocate(first)
    compute_all(bm, first)
    assert bm.num_cached_blocks == 2

    # Exactly the same 8 tokens: block 1 holds the last token, whose logits are needed.
    same = make_request("b", list(PREFIX))
    bm.allocate(same)
    assert same.block_ids == [0, 2]
    assert same.num_computed_tokens == 4

    # One more token: both full blocks may be reused now.
    longer = make_request("c", PREFIX + [9])
    bm.allocate(longer)
    bm.check_invariants()
    assert longer.block_ids == [0, 1, 3]
    assert longer.num_computed_tokens == 8


def test_free_returns_blocks_and_keeps_them_revivable() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_request("a", PREFIX + [8, 9, 10, 11])
    bm.allocate(first)
    compute_all(bm, first)
    bm.free(first)
    bm.check_invariants()
    assert first.block_ids == []
    assert bm.num_free_blocks == 8
    assert bm.num_cached_blocks == 3

    revived = make_request("b", PREFIX + [8, 9, 10, 11, 12])
    bm.allocate(revived)
    bm.check_invariants()
    assert revived.block_ids == [0, 1, 2, 3]  # three revived from the free queue, one fresh
    assert revived.num_computed_tokens == 12
    assert bm.num_free_blocks == 4


def test_eviction_takes_least_recently_freed_tail_blocks_first() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_request("a", PREFIX + [8, 9, 10, 11])
    bm.allocate(first)  # [0, 1, 2]
    compute_all(bm, first)
    bm.free(first)  # free queue, oldest first: 3 4 5 6 7 2 1 0 (tail block freed first)

    other = make_request("x", [50] * 24)
    bm.allocate(other)
    bm.check_invariants()
    assert other.block_ids == [3, 4, 5, 6, 7, 2]  # block 2 evicted: its hash is gone
    assert bm.num_cached_blocks == 2

    again = make_request("b", PREFIX + [8, 9, 10, 11, 12])
    # Hits 0 and 1 sit in the free queue and consume both remaining slots; 2 fresh more won't fit.
    assert not bm.can_allocate(again)
    bm.free(other)  # queue now: 1 0 2 7 6 5 4 3
    assert bm.can_allocate(again)
    bm.allocate(again)
    bm.check_invariants()
    assert again.block_ids == [0, 1, 2, 7]
    assert again.num_computed_tokens == 8


def test_referenced_hits_cost_no_free_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    first = make_request("a", PREFIX + [1])
    bm.allocate(first)  # [0, 1, 2]
    compute_all(bm, first)
    assert bm.num_free_blocks == 1
    second = make_request("b", PREFIX + [2, 2, 2, 2])  # 3 blocks, 2 of them shared
    assert bm.can_allocate(second)
    bm.allocate(second)
    bm.check_invariants()
    assert second.block_ids == [0, 1, 3]
    assert bm.num_free_blocks == 0

    no_cache = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    first = make_request("a", PREFIX + [1])
    no_cache.allocate(first)
    compute_all(no_cache, first)
    assert not no_cache.can_allocate(make_request("b", PREFIX + [2, 2, 2, 2]))


def test_hits_in_free_queue_consume_free_slots() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    first = make_request("a", PREFIX + [1])
    bm.allocate(first)
    compute_all(bm, first)
    bm.free(first)  # queue: 3 2 1 0, with 0 and 1 cached
    holder = make_request("x", [60] * 8)
    bm.allocate(holder)
    assert holder.block_ids == [3, 2]
    # Needs 3 blocks: 2 revived hits (both free slots) + 1 fresh = 3 slots > 2 free.
    second = make_request("b", PREFIX + [2, 2, 2, 2])
    assert not bm.can_allocate(second)
    # Only 2 blocks: the second full block holds the last token, so 1 hit + 1 fresh.
    short = make_request("c", list(PREFIX))
    assert bm.can_allocate(short)
    bm.allocate(short)
    bm.check_invariants()
    assert short.block_ids == [0, 1]  # hit 0 revived; fresh pop takes 1, evicting its hash
    assert short.num_computed_tokens == 4
    assert bm.num_cached_blocks == 1


def test_can_allocate_false_when_exhausted() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    first = make_request("a", [1] * 8)
    bm.allocate(first)
    waiting = make_request("b", [2])
    assert not bm.can_allocate(waiting)
    bm.free(first)
    assert bm.can_allocate(waiting)
    bm.allocate(waiting)
    assert waiting.block_ids == [1]  # block 1 was freed before block 0 (reverse order)


def test_append_grows_only_when_a_new_block_starts() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    req = make_request("a", [1, 2, 3, 4])
    bm.allocate(req)
    assert req.block_ids == [0]
    assert bm.can_append(req)
    bm.append(req)
    assert req.block_ids == [0]
    for token in (5, 6, 7, 8):
        req.append_token(token)
        assert bm.can_append(req)
        bm.append(req)
        bm.check_invariants()
        assert req.block_ids == [0, 1]
    req.append_token(9)
    assert not bm.can_append(req)


def test_duplicate_prefix_keeps_first_registration() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_request("a", PREFIX + [1])
    second = make_request("b", PREFIX + [1])
    bm.allocate(first)
    bm.allocate(second)  # nothing registered yet: all fresh
    assert (first.block_ids, second.block_ids) == ([0, 1, 2], [3, 4, 5])
    compute_all(bm, first)
    compute_all(bm, second)  # same hashes: the existing entries (blocks 0, 1) stay
    assert bm.num_cached_blocks == 2
    third = make_request("c", PREFIX + [1])
    bm.allocate(third)
    bm.check_invariants()
    assert third.block_ids == [0, 1, 6]


def test_hash_chain_depends_on_the_whole_prefix() -> None:
    assert hash_block_tokens(None, [1, 2]) == hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
    parent = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(parent, [3, 4]) != hash_block_tokens(None, [3, 4])

    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(first)
    compute_all(bm, first)
    # Block [5, 6, 7, 8] at position 0 has no parent: it must not match block 1 of `first`.
    moved = make_request("b", [5, 6, 7, 8, 9])
    bm.allocate(moved)
    assert moved.num_computed_tokens == 0


def test_readmission_keeps_first_num_cached_tokens() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    req = make_request("a", PREFIX + [1])
    bm.allocate(req)
    compute_all(bm, req)
    bm.free(req)  # as a preemption does
    req.num_computed_tokens = 0
    req.num_preemptions = 1
    bm.allocate(req)
    assert req.num_computed_tokens == 8  # its own blocks revived
    assert req.num_cached_tokens == 0  # still what the first admission found


def test_prefix_caching_off_never_hits_or_counts() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    first = make_request("a", PREFIX + [1])
    bm.allocate(first)
    compute_all(bm, first)
    second = make_request("b", PREFIX + [1])
    bm.allocate(second)
    assert second.block_ids == [3, 4, 5]
    assert second.num_computed_tokens == 0
    assert (bm.num_prefix_queries, bm.num_prefix_hits, bm.num_cached_blocks) == (0, 0, 0)


def test_free_is_idempotent_and_reset_needs_an_empty_pool() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    req = make_request("a", PREFIX + [1])
    bm.allocate(req)
    compute_all(bm, req)
    assert not bm.reset_prefix_cache()
    bm.free(req)
    bm.free(req)
    bm.check_invariants()
    assert bm.num_free_blocks == 4
    assert bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0
    bm.allocate(req)
    assert req.num_computed_tokens == 0


def test_check_invariants_catches_a_leaked_reference() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    req = make_request("a", [1, 2, 3])
    bm.allocate(req)
    req.block_ids = []  # forgotten without free(): block 0 is still counted as referenced
    with pytest.raises(AssertionError):
        bm.check_invariants()


def test_state_is_per_request_object_not_per_request_id() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    cached = make_request("cached", PREFIX + [1])
    bm.allocate(cached)
    compute_all(bm, cached)
    # Two live requests reusing one id (a caller bug) must still get hits from their own tokens.
    other = make_request("dup", [5] * 9)
    assert bm.can_allocate(other)  # memoizes other's hashes
    same_prefix = make_request("dup", PREFIX + [2])
    bm.allocate(same_prefix)
    bm.allocate(other)
    bm.check_invariants()
    assert same_prefix.num_computed_tokens == 8 and same_prefix.block_ids[:2] == [0, 1]
    assert other.num_computed_tokens == 0


def test_sliding_window_releases_the_blocks_behind_it() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, sliding_window=6)
    req = make_request("a", list(range(10)), max_tokens=20)
    bm.allocate(req)
    req.num_computed_tokens = 10  # the prompt: the next query (position 10) sees keys 5..10
    bm.cache_computed_blocks(req)
    bm.release_outside_window(req)
    bm.check_invariants()
    assert req.block_ids[:1] == [RELEASED] and RELEASED not in req.block_ids[1:]  # block 0 (keys 0-3) only
    for token in range(30, 40):  # decode: a block is released each time the window leaves it whole
        req.append_token(token)
        bm.append(req)
        req.num_computed_tokens += 1
        bm.cache_computed_blocks(req)
        bm.release_outside_window(req)
        bm.check_invariants()
        held = [b for b in req.block_ids if b != RELEASED]
        assert len(held) <= -(-(6 + 1) // 4) + 1, req  # the window's span, not the sequence's
    assert req.block_ids[:3] == [RELEASED] * 3
    released_block = 0
    assert bm.num_free_blocks == 16 - len([b for b in req.block_ids if b != RELEASED])
    bm.free(req)
    bm.check_invariants()
    assert bm.num_free_blocks == 16
    # A released block keeps its prefix-cache entry, like any freed block: the same prompt hits it.
    again = make_request("b", list(range(10)))
    bm.allocate(again)
    assert again.block_ids[0] == released_block and again.num_computed_tokens == 8


def test_no_window_releases_nothing() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    req = make_request("a", list(range(30)))
    bm.allocate(req)
    compute_all(bm, req)
    bm.release_outside_window(req)
    assert RELEASED not in req.block_ids
