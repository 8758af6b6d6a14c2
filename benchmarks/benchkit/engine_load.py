"""A closed-loop load on an in-process engine (no HTTP): seeded random prompts, `concurrency` requests in
flight, exactly `output_len` greedy tokens each (ignore_eos)."""

from __future__ import annotations

import asyncio
import time

import torch

from lmserve.engine.engine import NativeEngine
from lmserve.types import GenerationRequest, SamplingParams


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Skip the low ids, where the special tokens live.
    return torch.randint(100, vocab, (num, length), generator=gen).tolist()


async def engine_run(engine: NativeEngine, prompts: list[list[int]], concurrency: int, output_len: int) -> dict:
    """Every prompt through the started engine; output tokens, wall seconds, tokens/s and the median TTFT
    (a dict, as the GPU benchmark adds its own fields to it and writes it as JSON)."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    num_tokens = 0

    async def one(i: int, prompt: list[int]) -> None:
        nonlocal num_tokens
        async with sem:
            start = time.perf_counter()
            first = True
            async for delta in engine.generate(GenerationRequest(prompt, params, f"b{i}")):
                if first:
                    ttfts.append(time.perf_counter() - start)
                    first = False
                num_tokens += len(delta.token_ids)

    start = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    elapsed = time.perf_counter() - start
    ttfts.sort()
    return {"tokens": num_tokens, "seconds": elapsed, "tok_s": num_tokens / elapsed, "ttft_median": ttfts[len(ttfts) // 2]}
