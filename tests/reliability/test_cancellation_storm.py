"""A cancellation storm: 200 requests with large max_tokens, cancelled after a random fraction of a second,
HTTP disconnects and gRPC cancels mixed (streaming and not), some while queued, some in prefill, some
decoding. Afterwards nothing is running or waiting, no KV block is held (blocks kept only by the prefix
cache are free), nothing is in flight, and a fresh request is served within 5 s."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from lmserve.config import LimitsConfig
from tests.api.conftest import LiveServer
from tests.reliability.conftest import MAX_MODEL_LEN, live_server, native, tiny_config, wait_idle

NUM_REQUESTS = 200
MAX_CANCEL_AFTER_S = 0.6
# Every tenth request is a stream whose cancel clock starts at its first token, so that however loaded the
# machine, some are cut mid-decode (the others mostly while queued or in prefill).
AFTER_FIRST_TOKEN_EVERY = 10
KINDS = ("http-stream", "http", "grpc-stream", "grpc")


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, cache_dir: Path) -> Iterator[LiveServer]:
    limits = LimitsConfig(max_tokens_cap=MAX_MODEL_LEN, max_queue=NUM_REQUESTS + 10)
    config = tiny_config(tiny_llama_dir, cache_dir, limits, max_num_seqs=16, max_num_batched_tokens=256)
    with live_server(config) as live:
        yield live


@dataclass
class Outcome:
    kind: str
    num_tokens: int  # streamed before the cancel (-1: not a stream)
    finished: bool  # it ended on its own before the cancel


async def _one(
    kind: str,
    prompt: list[int],
    cancel_after: float,
    after_first_token: bool,
    client: httpx.AsyncClient,
    stub: rpc.GenerationStub,
    server: LiveServer,
) -> Outcome:
    max_tokens = MAX_MODEL_LEN - len(prompt)
    counted = [0]
    first_token = asyncio.Event()
    if kind.startswith("http"):
        body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": kind == "http-stream"}

        async def work() -> None:
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith('data: {"id"'):
                        counted[0] += 1
                        first_token.set()

        task = asyncio.create_task(work())
        if after_first_token:
            await asyncio.wait({task, asyncio.create_task(first_token.wait())}, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait({task}, timeout=cancel_after)
        finished = task.done()
        task.cancel()  # closes the connection: the server sees a disconnect
        await asyncio.gather(task, return_exceptions=True)
        return Outcome(kind, counted[0] if body["stream"] else -1, finished)

    req = pb.CompletionRequest(prompt_token_ids=pb.TokenIds(ids=prompt), max_tokens=max_tokens, ignore_eos=True)
    if kind == "grpc":
        unary = stub.Complete(req, metadata=server.grpc_metadata)
        await asyncio.sleep(cancel_after)
        finished = unary.done()
        unary.cancel()
        return Outcome(kind, -1, finished)
    call = stub.CompleteStream(req, metadata=server.grpc_metadata)

    async def read() -> None:
        async for chunk in call:
            if chunk.choices and chunk.choices[0].token_ids:
                counted[0] += 1
                first_token.set()

    reader = asyncio.create_task(read())
    if after_first_token:
        await asyncio.wait({reader, asyncio.create_task(first_token.wait())}, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.sleep(cancel_after)
    finished = reader.done()
    call.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    return Outcome(kind, counted[0], finished)


def test_two_hundred_cancelled_requests_leave_nothing_behind(server: LiveServer) -> None:
    state = server.state
    engine = native(state)
    engine.runner.fault_hook = lambda _: time.sleep(0.002)  # a touch slower than the tiny model, like a real one
    rng = random.Random(17)
    vocab = state.tokenizer.vocab_size
    requests = [
        (
            KINDS[i % len(KINDS)],
            [rng.randrange(3, vocab) for _ in range(rng.randrange(40, 300))],
            rng.uniform(0.0, MAX_CANCEL_AFTER_S),
            i % AFTER_FIRST_TOKEN_EVERY == 0,  # i is even then: an HTTP or a gRPC stream
        )
        for i in range(NUM_REQUESTS)
    ]
    peak_waiting = []

    async def watch() -> None:
        while True:
            peak_waiting.append(state.engine.stats().num_waiting)
            await asyncio.sleep(0.05)

    async def go() -> list[Outcome]:
        limits = httpx.Limits(max_connections=NUM_REQUESTS, max_keepalive_connections=0)
        async with (
            httpx.AsyncClient(base_url=server.base_url, headers=server.headers, timeout=30, limits=limits) as client,
            grpc.aio.insecure_channel(server.grpc_target) as channel,
        ):
            stub = rpc.GenerationStub(channel)
            watcher = asyncio.create_task(watch())
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(_one(k, p, t, a, client, stub, server) for k, p, t, a in requests)), 90
            )
            watcher.cancel()
            return outcomes

    try:
        outcomes = asyncio.run(go())
    finally:
        engine.runner.fault_hook = None
    wait_idle(state, timeout_s=10)
    assert native(state).block_manager.num_free_blocks == native(state).block_manager.num_blocks

    # The storm was one: most requests were cancelled, queued ones among them, and streams were cut both
    # before their first token and mid-decode.
    assert sum(not o.finished for o in outcomes) >= NUM_REQUESTS * 0.9
    assert max(peak_waiting) >= 20
    streamed = [o.num_tokens for o in outcomes if o.num_tokens >= 0 and not o.finished]
    assert any(n == 0 for n in streamed) and any(n > 0 for n in streamed)

    started = time.monotonic()
    resp = httpx.post(
        f"{server.base_url}/v1/completions",
        json={"prompt": "Hello", "max_tokens": 16, "ignore_eos": True},
        headers=server.headers,
        timeout=5,
    )
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 16
    assert time.monotonic() - started < 5
    wait_idle(state)
