"""Paged KV cache bookkeeping: which physical blocks each request owns, plus the prefix cache.

Pure Python, no torch: the model runner owns the tensors, this class only hands out block ids.

Prefix caching follows vLLM's design. Every FULL block gets a chained hash
(hash of the previous block, token ids of this block), so equal hashes mean equal token
prefixes. A block whose KV has been written is registered under its hash; a later request
with the same prefix reuses it (ref count + 1) instead of recomputing. Freed blocks keep
their hash while they sit in an LRU free queue, so they can be revived until a fresh
allocation evicts them.

With a sliding window on every layer (`sliding_window`), the blocks wholly before the window of a request's
next query are released as the request advances: the KV memory a long request holds stays bounded by the
window.

The chained hash is SHA-256 rather than Python's `hash()`: `hash()` of a tuple of ints is
deterministic and not collision resistant, so a crafted prompt could collide with another
tenant's prefix and be served (or poison) its KV cache (cf. vLLM GHSA-rm76-4mrf-v9r8).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from lmserve.engine.request import Request

BlockHash = bytes
# A request's block_ids entry whose block left every sliding window and was released (release_outside_window):
# the entry keeps its place so that index i still covers tokens [i * block_size, (i + 1) * block_size).
RELEASED = -1


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int], salt: bytes = b"") -> BlockHash:
    """The chained hash of one full block: SHA-256 over the parent's digest and the block's token ids. A
    first block's `salt` (a LoRA adapter's id) keeps the KV of different weights apart: two adapters, or an
    adapter and the base, never share a block."""
    hasher = hashlib.sha256()
    # The first block has no parent; a 1-byte tag keeps "no parent" distinct from any digest.
    if parent_hash is not None:
        hasher.update(b"\x01" + parent_hash)
    else:
        hasher.update(b"\x02" + salt if salt else b"\x00")
    hasher.update(array("q", token_ids).tobytes())
    return hasher.digest()


class BlockManager:
    """Hands out fixed-size KV blocks to requests; ask first (`can_*`), then act.

    Running out of blocks is normal (the scheduler preempts or waits), so nothing here
    raises for it; acting without asking first is a programming error and asserts.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, sliding_window: int | None = None
    ) -> None:
        assert num_blocks >= 1 and block_size >= 1 and (sliding_window is None or sliding_window >= 1)
        self._num_blocks = num_blocks
        self._block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self._ref_counts: list[int] = [0] * num_blocks
        # Per-block registered hash (None: not in the prefix cache) and its inverse.
        self._block_hashes: list[BlockHash | None] = [None] * num_blocks
        self._hash_to_block: dict[BlockHash, int] = {}
        # Unreferenced blocks, least recently freed first; fresh allocations pop from the front.
        self._free_queue: OrderedDict[int, None] = OrderedDict((block_id, None) for block_id in range(num_blocks))
        # Per-request state is keyed by id(req), not request_id, so correctness never depends on
        # callers keeping request ids unique; each entry holds the Request so its id stays unique.
        # Requests currently holding blocks (for invariants and sanity checks).
        self._requests: dict[int, Request] = {}
        # Chained hashes of a request's full blocks computed so far (token ids only grow).
        self._request_hashes: dict[int, tuple[Request, list[BlockHash]]] = {}
        # How many of a request's leading blocks cache_computed_blocks has already handled.
        self._num_registered: dict[int, int] = {}
        # How many of a request's leading blocks release_outside_window has released.
        self._num_released: dict[int, int] = {}
        self.num_prefix_queries = 0  # tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # tokens served from it

    # ---- sizes -------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request references (cached-but-unreferenced ones included: they are evictable)."""
        return len(self._free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self._num_blocks - len(self._free_queue)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (referenced or not)."""
        return len(self._hash_to_block)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self._block_size)

    # ---- admission ---------------------------------------------------------------------

    def can_allocate(self, req: Request) -> bool:
        """Whether `allocate(req)` would succeed now: exactly the free-queue slots it would consume."""
        return self._num_slots_needed(req, self._find_hits(req)) <= len(self._free_queue)

    def allocate(self, req: Request) -> None:
        """Give `req` blocks for all its tokens, reusing cached full-block prefixes.

        Sets block_ids, num_computed_tokens (the reused tokens) and, on first admission,
        num_cached_tokens. Chunked prefill then only advances num_computed_tokens.
        """
        assert id(req) not in self._requests, f"{req} already holds blocks"
        assert not req.block_ids
        hit_block_ids = self._find_hits(req)
        assert self._num_slots_needed(req, hit_block_ids) <= len(self._free_queue), "allocate() without can_allocate()"
        block_ids: list[int] = []
        for block_id in hit_block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free_queue[block_id]  # revive it
            self._ref_counts[block_id] += 1
            block_ids.append(block_id)
        for _ in range(self.num_blocks_for(req.num_tokens) - len(hit_block_ids)):
            block_ids.append(self._take_fresh_block())
        num_hit_tokens = len(hit_block_ids) * self._block_size
        req.block_ids = block_ids
        req.num_computed_tokens = num_hit_tokens
        if req.num_preemptions == 0:
            req.num_cached_tokens = num_hit_tokens
        self._requests[id(req)] = req
        self._num_registered[id(req)] = len(hit_block_ids)
        if self.enable_prefix_caching:
            self.num_prefix_queries += req.num_tokens
            self.num_prefix_hits += num_hit_tokens

    # ---- decode ------------------------------------------------------------------------

    def can_append(self, req: Request, num_lookahead: int = 0) -> bool:
        """Whether there is room for all `req.num_tokens` tokens (the newest sits at slot num_tokens-1) and
        `num_lookahead` more (speculative drafts, whose KV the step writes before they are accepted)."""
        num_missing = self.num_blocks_for(req.num_tokens + num_lookahead) - len(req.block_ids)
        return num_missing <= len(self._free_queue)

    def append(self, req: Request, num_lookahead: int = 0) -> None:
        """Grow `req` to cover all its tokens and `num_lookahead` more. Blocks a rejected draft leaves
        unused stay with the request (its next tokens fill them) until it is freed."""
        assert id(req) in self._requests, f"{req} holds no blocks"
        assert self.can_append(req, num_lookahead), "append() without can_append()"
        while req.num_tokens + num_lookahead > len(req.block_ids) * self._block_size:
            req.block_ids.append(self._take_fresh_block())

    # ---- prefix cache ------------------------------------------------------------------

    def cache_computed_blocks(self, req: Request) -> None:
        """Register the full blocks whose KV is now written ([0, num_computed_tokens)) for reuse.

        Called after each forward; registering earlier would let another request read KV that
        is not there yet. A hash already owned by another block keeps that owner.
        """
        if not self.enable_prefix_caching or id(req) not in self._requests:
            return
        num_done = self._num_registered[id(req)]
        num_full = min(req.num_computed_tokens // self._block_size, len(req.block_ids))
        if num_full <= num_done:
            return
        hashes = self._full_block_hashes(req, num_full)
        for index in range(num_done, num_full):
            block_id = req.block_ids[index]
            if block_id == RELEASED or self._block_hashes[block_id] is not None:
                continue  # a prefix hit: registered already
            block_hash = hashes[index]
            if block_hash in self._hash_to_block:
                continue  # another block holds the same prefix; this duplicate stays uncached
            self._block_hashes[block_id] = block_hash
            self._hash_to_block[block_hash] = block_id
        self._num_registered[id(req)] = num_full

    # ---- release -----------------------------------------------------------------------

    def release_outside_window(self, req: Request) -> None:
        """With a sliding window: release the blocks no later query of `req` reads. Its next query sits at
        position num_computed_tokens and sees keys from num_computed_tokens - window + 1 on; every later one
        sees less. Called after cache_computed_blocks, so a released block keeps its prefix-cache entry
        (unreferenced, in the LRU queue) like any freed block."""
        if self.sliding_window is None or id(req) not in self._requests:
            return
        first_needed = max(req.num_computed_tokens - self.sliding_window + 1, 0)
        done = self._num_released.get(id(req), 0)
        upto = min(first_needed // self._block_size, len(req.block_ids))
        for index in range(done, upto):
            self._unref(req.block_ids[index])
            req.block_ids[index] = RELEASED
        self._num_released[id(req)] = max(done, upto)

    def _unref(self, block_id: int) -> None:
        self._ref_counts[block_id] -= 1
        assert self._ref_counts[block_id] >= 0
        if self._ref_counts[block_id] == 0:
            self._free_queue[block_id] = None

    def free(self, req: Request) -> None:
        """Drop `req`'s references; unreferenced blocks go to the LRU queue keeping their hash.

        Tail blocks are queued first so they are evicted first: a prompt's head is the part
        most likely to be shared. Idempotent.
        """
        for block_id in reversed(req.block_ids):
            if block_id != RELEASED:
                self._unref(block_id)
        req.block_ids = []
        self._requests.pop(id(req), None)
        self._request_hashes.pop(id(req), None)
        self._num_registered.pop(id(req), None)
        self._num_released.pop(id(req), None)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (e.g. after a weights reload); refused while blocks are in use."""
        if self._requests:
            return False
        self._hash_to_block.clear()
        self._block_hashes = [None] * self._num_blocks
        return True

    # ---- checks ------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert the bookkeeping is self-consistent (tests call this after every operation)."""
        expected_refs = [0] * self._num_blocks
        for key, req in self._requests.items():
            assert id(req) == key
            held = [b for b in req.block_ids if b != RELEASED]
            assert len(set(held)) == len(held), f"{req} lists a block twice"
            assert RELEASED not in req.block_ids[self._num_released.get(key, 0) :], f"{req}: a hole after the window"
            for block_id in held:
                expected_refs[block_id] += 1
        assert expected_refs == self._ref_counts, (expected_refs, self._ref_counts)
        for block_id in range(self._num_blocks):
            is_free = block_id in self._free_queue
            assert is_free == (self._ref_counts[block_id] == 0), f"block {block_id} free/referenced mismatch"
        assert len(self._free_queue) + sum(1 for n in self._ref_counts if n > 0) == self._num_blocks
        for block_hash, block_id in self._hash_to_block.items():
            assert self._block_hashes[block_id] == block_hash, f"block {block_id} hash mismatch"
        num_hashed = sum(1 for block_hash in self._block_hashes if block_hash is not None)
        assert num_hashed == len(self._hash_to_block)

    # ---- internals ---------------------------------------------------------------------

    def _take_fresh_block(self) -> int:
        """Pop the least recently freed block, evicting its cached hash."""
        block_id, _ = self._free_queue.popitem(last=False)
        block_hash = self._block_hashes[block_id]
        if block_hash is not None:
            del self._hash_to_block[block_hash]
            self._block_hashes[block_id] = None
        self._ref_counts[block_id] = 1
        return block_id

    def _num_slots_needed(self, req: Request, hit_block_ids: list[int]) -> int:
        """Free-queue slots an allocation takes: fresh blocks plus hits revived from the queue."""
        num_fresh = self.num_blocks_for(req.num_tokens) - len(hit_block_ids)
        # A hit that nobody references sits in the free queue, so reviving it uses a free slot too.
        num_revived = sum(1 for block_id in hit_block_ids if self._ref_counts[block_id] == 0)
        return num_fresh + num_revived

    def _find_hits(self, req: Request) -> list[int]:
        """Cached blocks matching `req`'s leading full blocks, never including its last token's block."""
        if not self.enable_prefix_caching or req.needs_prompt_logprobs:
            return []  # prompt logprobs need every prompt position's hidden state: computed, not reused
        max_hits = (req.num_tokens - 1) // self._block_size
        hit_block_ids: list[int] = []
        if max_hits == 0:
            return hit_block_ids
        for block_hash in self._full_block_hashes(req, max_hits):
            block_id = self._hash_to_block.get(block_hash)
            if block_id is None:
                break
            hit_block_ids.append(block_id)
        return hit_block_ids

    def _full_block_hashes(self, req: Request, num_full_blocks: int) -> list[BlockHash]:
        """Chained hashes of `req`'s first `num_full_blocks` blocks, memoized per request.

        Token ids only ever grow, so the memo stays valid. The entry holds the Request (its id
        cannot be reused meanwhile) until free() drops it; the scheduler frees every request that
        leaves, finished or aborted, waiting or running.
        """
        entry = self._request_hashes.get(id(req))
        if entry is None:
            entry = self._request_hashes[id(req)] = (req, [])
        hashes = entry[1]
        size = self._block_size
        assert num_full_blocks * size <= req.num_tokens
        while len(hashes) < num_full_blocks:
            start = len(hashes) * size
            parent = hashes[-1] if hashes else None
            salt = b"" if hashes or req.lora is None else str(req.lora.id).encode()
            hashes.append(hash_block_tokens(parent, req.token_ids[start : start + size], salt))
        return hashes[:num_full_blocks]
