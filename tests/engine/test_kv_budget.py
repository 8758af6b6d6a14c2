"""The KV pool never grows past its memory budget: sized from `kv_cache_memory_bytes` once, at load, and
under four times the demand it can hold, every step keeps its block usage within the pool, the pool tensor
is never reallocated, and every request still completes (by preemption and recompute, never by growth)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from lmserve.config import EngineConfig
from lmserve.engine.engine import NativeEngine
from lmserve.engine.scheduler import SchedulerOutput
from lmserve.types import GenerationRequest, SamplingParams

BLOCK_SIZE = 16
NUM_BLOCKS_BUDGETED = 10
PROMPT_LEN = 30
MAX_TOKENS = 34  # 64 tokens in all: 4 blocks per request
NUM_REQUESTS = 10  # 40 blocks of demand against a pool of 10


def test_kv_pool_stays_within_its_budget_under_four_times_the_demand(tiny_llama_dir: Path) -> None:
    probe = NativeEngine.load(tiny_llama_dir, "tiny", EngineConfig(dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=1))
    bytes_per_block = probe.runner.kv_spec.bytes_per_block
    del probe
    budget = NUM_BLOCKS_BUDGETED * bytes_per_block + bytes_per_block // 2  # half a block more: rounded down
    config = EngineConfig(dtype="float32", block_size=BLOCK_SIZE, kv_cache_memory_bytes=budget, enable_prefix_caching=False)
    engine = NativeEngine.load(tiny_llama_dir, "tiny", config)
    pool = engine.runner.kv_caches
    blocks = engine.block_manager
    assert blocks.num_blocks == NUM_BLOCKS_BUDGETED
    assert pool.numel() * pool.element_size() == NUM_BLOCKS_BUDGETED * bytes_per_block <= budget
    pool_address, pool_shape = pool.data_ptr(), tuple(pool.shape)

    used_per_step: list[int] = []
    preempted: list[int] = []
    problems: list[str] = []
    execute = engine.runner.execute

    def checked_execute(scheduled: SchedulerOutput):  # type: ignore[no-untyped-def]
        # On the engine thread, with the step's blocks allocated: the moment usage peaks.
        used_per_step.append(blocks.num_used_blocks)
        preempted.append(len(scheduled.preempted))
        blocks.check_invariants()
        current = engine.runner.kv_caches
        if current.data_ptr() != pool_address or tuple(current.shape) != pool_shape:
            problems.append(f"the KV pool was reallocated: {tuple(current.shape)}")
        return execute(scheduled)

    engine.runner.execute = checked_execute  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    requests = [
        GenerationRequest([1000 + 100 * i + k for k in range(PROMPT_LEN)], params, f"r{i}") for i in range(NUM_REQUESTS)
    ]

    async def run_all() -> list[int]:
        async def one(request: GenerationRequest) -> int:
            return sum([len(delta.token_ids) async for delta in engine.generate(request)])

        await engine.start()
        try:
            return list(await asyncio.gather(*(one(r) for r in requests)))
        finally:
            await engine.stop()

    num_tokens = asyncio.run(run_all())
    assert num_tokens == [MAX_TOKENS] * NUM_REQUESTS  # nobody refused or cut short for want of blocks
    assert not problems, problems
    assert max(used_per_step) == NUM_BLOCKS_BUDGETED  # the pool was really full...
    assert all(used <= NUM_BLOCKS_BUDGETED for used in used_per_step)  # ...and never more than full
    assert sum(preempted) > 0  # the overflow was handled by preemption
    assert blocks.num_used_blocks == 0 and blocks.num_free_blocks == NUM_BLOCKS_BUDGETED
    assert engine.runner.kv_caches.data_ptr() == pool_address
