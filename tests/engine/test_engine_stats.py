"""The engine's stats plumbing: per-step hook, cumulative counters and RequestTiming, read through Metrics.

A pool of 4 blocks of 16 tokens and two 16-token prompts that each grow to 36 tokens (3 blocks): the two
fill the pool at 32 tokens each, so the older one's 33rd token preempts the newer one exactly once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from lmserve.config import EngineConfig
from lmserve.engine.engine import NativeEngine
from lmserve.engine.scheduler import SchedulerOutput
from lmserve.metrics import Metrics
from lmserve.types import GenerationDelta, GenerationRequest, SamplingParams

BLOCK_SIZE = 16
PROMPT_LEN = 16
MAX_TOKENS = 20


def sample_values(metrics: Metrics) -> dict[str, float]:
    """Every sample of the registry by name (each name has one series here: one model label)."""
    text = metrics.render().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if "le" not in s.labels}


async def run_all(engine: NativeEngine, requests: list[GenerationRequest]) -> list[list[GenerationDelta]]:
    async def one(request: GenerationRequest) -> list[GenerationDelta]:
        return [delta async for delta in engine.generate(request)]

    await engine.start()
    try:
        return list(await asyncio.gather(*(one(r) for r in requests)))
    finally:
        await engine.stop()


def test_step_hook_counters_and_timing_match_the_work_done(tiny_llama_dir: Path) -> None:
    config = EngineConfig(dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=4, enable_prefix_caching=False)
    engine = NativeEngine.load(tiny_llama_dir, "tiny", config)
    metrics = Metrics("tiny")
    engine.on_step = metrics.observe_step
    # The work the model really did, seen from outside the engine: (sequences, tokens) per forward.
    forwards: list[tuple[int, int]] = []
    execute = engine.runner.execute

    def counting_execute(scheduled: SchedulerOutput):  # type: ignore[no-untyped-def]
        forwards.append((len(scheduled.scheduled), scheduled.num_batched_tokens))
        return execute(scheduled)

    engine.runner.execute = counting_execute  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    prompts = [list(range(1000, 1000 + PROMPT_LEN)), list(range(2000, 2000 + PROMPT_LEN))]
    streams = asyncio.run(run_all(engine, [GenerationRequest(p, params, f"r{i}") for i, p in enumerate(prompts)]))

    metrics.observe_engine(engine.stats())
    values = sample_values(metrics)
    num_tokens_computed = sum(tokens for _, tokens in forwards)
    assert values["lmserve_engine_steps_total"] == len(forwards)
    assert values["lmserve_engine_step_sequences_count"] == len(forwards)
    assert values["lmserve_engine_step_sequences_sum"] == sum(seqs for seqs, _ in forwards)
    assert values["lmserve_engine_step_tokens_count"] == len(forwards)
    assert values["lmserve_engine_step_tokens_sum"] == num_tokens_computed
    assert values["lmserve_engine_step_duration_seconds_count"] == len(forwards)
    # Every prompt and output token but each sequence's last once, plus what the preempted one recomputed.
    assert num_tokens_computed > 2 * (PROMPT_LEN + MAX_TOKENS - 1)
    assert values["lmserve_preemptions_total"] == 1
    assert values["lmserve_prefix_cache_query_tokens_total"] == 0  # prefix caching is off
    assert values["lmserve_kv_blocks_capacity"] == 4
    assert values["lmserve_kv_blocks_used"] == 0
    assert values["lmserve_kv_cache_usage_ratio"] == 0.0

    for deltas in streams:
        assert [len(d.token_ids) for d in deltas] == [1] * MAX_TOKENS
        assert all(d.timing is None for d in deltas[:-1]), "only the finishing delta carries the timing"
    timings = [deltas[-1].timing for deltas in streams]
    assert all(t is not None for t in timings)
    for t in timings:
        assert t is not None and t.first_scheduled_time is not None and t.first_token_time is not None
        assert t.arrival_time <= t.first_scheduled_time <= t.first_token_time <= t.finished_time
    assert sorted(t.num_preemptions for t in timings if t is not None) == [0, 1]

    # A scrape with no new work moves no counter.
    metrics.observe_engine(engine.stats())
    assert sample_values(metrics)["lmserve_engine_steps_total"] == len(forwards)
    assert sample_values(metrics)["lmserve_preemptions_total"] == 1


def test_prefix_cache_counters_are_tokens(tiny_llama_dir: Path) -> None:
    """The same 40-token prompt twice: the second reuses its two whole blocks (32 tokens); the block
    holding the last prompt token is always recomputed."""
    config = EngineConfig(dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=16)
    engine = NativeEngine.load(tiny_llama_dir, "tiny", config)
    metrics = Metrics("tiny")
    prompt = list(range(3000, 3040))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    async def twice() -> list[GenerationDelta]:
        await engine.start()
        try:
            finals = []
            for i in range(2):
                finals.append([d async for d in engine.generate(GenerationRequest(prompt, params, f"p{i}"))][-1])
            return finals
        finally:
            await engine.stop()

    finals = asyncio.run(twice())
    metrics.observe_engine(engine.stats())
    values = sample_values(metrics)
    assert [d.num_cached_tokens for d in finals] == [0, 32]
    assert values["lmserve_prefix_cache_query_tokens_total"] == 2 * 40
    assert values["lmserve_prefix_cache_hit_tokens_total"] == 32
    assert values["lmserve_preemptions_total"] == 0
