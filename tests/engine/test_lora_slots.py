"""LoRA bookkeeping without torch: the slot table, the scheduler's admission by slot, and the prefix cache
keyed by adapter as well as tokens."""

from __future__ import annotations

from pathlib import Path

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.lora_registry import LoraAdapter
from lmserve.engine.lora_slots import LoraSlots
from lmserve.engine.request import Request
from lmserve.engine.scheduler import Scheduler
from lmserve.types import FinishReason, SamplingParams


def _adapter(adapter_id: int) -> LoraAdapter:
    return LoraAdapter(adapter_id, f"a{adapter_id}", Path(f"/adapters/a{adapter_id}"), rank=8, num_bytes=0, created=0)


def _request(name: str, tokens: list[int], adapter: LoraAdapter | None, max_tokens: int = 4) -> Request:
    return Request(name, tokens, SamplingParams(max_tokens=max_tokens), lora=adapter)


def test_slots_fill_empty_ones_first_then_evict_the_least_recently_used_unpinned() -> None:
    slots = LoraSlots(2)
    assert [slots.acquire(1), slots.acquire(2)] == [0, 1]
    assert slots.acquire(1) == 0  # resident: the same slot, pinned twice
    assert not slots.can_acquire(3)  # both pinned
    slots.release(1)  # adapter 2's slot is free, adapter 1 is still pinned once
    assert slots.can_acquire(3) and slots.acquire(3) == 1 and slots.num_evictions == 1
    assert slots.adapter_ids == [1, 3]
    slots.release(0)
    slots.release(0)
    slots.release(1)
    assert slots.acquire(4) == 0  # both unpinned: adapter 1 was used before adapter 3
    assert slots.adapter_ids == [4, 3] and slots.num_resident == 2 and slots.num_evictions == 2


def test_scheduler_admits_in_order_while_adapters_fit_the_slots_and_frees_them() -> None:
    a, b, c = _adapter(1), _adapter(2), _adapter(3)
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, lora_slots=LoraSlots(2))
    reqs = [_request("a", [1, 2, 3], a), _request("base", [4, 5], None), _request("b", [6, 7], b),
            _request("c", [8, 9], c), _request("a2", [10, 11], a)]  # fmt: skip
    for req in reqs:
        scheduler.add_request(req)
    out = scheduler.schedule()
    # c waits (both slots pinned by a and b); a2 behind it waits too: no skipping ahead in the queue.
    assert [s.request.request_id for s in out.scheduled] == ["a", "base", "b"]
    assert [r.lora_slot for r in reqs] == [0, -1, 1, -1, -1]
    scheduler.update(out, {s.request.request_id: [99] for s in out.scheduled})
    scheduler.finish_request(reqs[0], FinishReason.ABORT)
    assert reqs[0].lora_slot == -1
    out = scheduler.schedule()
    # c takes a's slot (an eviction); a2's adapter is then out of the slots, both pinned: it waits.
    assert [s.request.request_id for s in out.scheduled] == ["base", "b", "c"]
    assert reqs[3].lora_slot == 0 and scheduler.lora_slots.num_evictions == 1
    scheduler.finish_request(reqs[3], FinishReason.ABORT)
    out = scheduler.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["base", "b", "a2"] and reqs[4].lora_slot == 0


def test_prefix_cache_never_shares_blocks_between_adapters_or_with_the_base() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(100, 110))
    first = _request("base", tokens, None)
    bm.allocate(first)
    first.num_computed_tokens = first.num_tokens
    bm.cache_computed_blocks(first)
    for adapter in (_adapter(1), _adapter(2)):
        req = _request(f"lora{adapter.id}", tokens, adapter)
        bm.allocate(req)
        assert req.num_cached_tokens == 0, "another adapter's (or the base's) KV was offered"
        req.num_computed_tokens = req.num_tokens
        bm.cache_computed_blocks(req)
    again = _request("again", tokens, _adapter(2))
    bm.allocate(again)
    assert again.num_cached_tokens == 8  # its own adapter's two full blocks
    bm.check_invariants()
