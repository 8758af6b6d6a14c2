"""gRPC against HTTP on one lmserve server: streamed completions and unary Tokenize calls.

    .venv/bin/python benchmarks/grpc_vs_http.py [--concurrency 1 16 64] [--rounds 2]

Starts `lmserve serve` (bundled model, its default dtype, no embeddings, `--no-safety`: the filter's own
cost is benchmarks/safety_stream.py's) on loopback with both transports, then, in this client process,
runs the same load over each transport back to back, alternating which goes first each round: random
prompts of --input-len token ids (fresh ones per run, so no run finds another's in the prefix cache),
--output-len tokens each (ignore_eos), `--requests-per-user` requests per concurrent user, after an
untimed warm-up pass over each transport at the highest concurrency. HTTP goes through aiohttp, as
`vllm bench serve` does. Prints output tokens/s, median TTFT and TPOT for each transport and
concurrency, then Tokenize calls per second at --tokenize-concurrency, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import dataclass

import aiohttp
import grpc

from benchkit.cli import add_concurrency, add_lengths, add_rounds
from benchkit.server import ServerCommand, exit_on_sigterm, free_port, lmserve_command, serving
from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc


@dataclass
class Sample:
    ttft_s: float
    tpot_s: float | None
    num_tokens: int


@dataclass
class Result:
    transport: str
    concurrency: int
    wall_s: float
    samples: list[Sample]

    @property
    def tokens_per_s(self) -> float:
        return sum(s.num_tokens for s in self.samples) / self.wall_s

    @property
    def ttft_ms(self) -> float:
        return 1000 * statistics.median(s.ttft_s for s in self.samples)

    @property
    def tpot_ms(self) -> float:
        return 1000 * statistics.median(s.tpot_s for s in self.samples if s.tpot_s is not None)


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(length)] for _ in range(n)]


def _sample(start: float, first: float | None, last: float | None, num_tokens: int) -> Sample:
    assert first is not None and last is not None, "no token arrived"
    tpot = (last - first) / (num_tokens - 1) if num_tokens > 1 else None
    return Sample(first - start, tpot, num_tokens)


async def http_stream(client: aiohttp.ClientSession, prompt: list[int], output_len: int) -> Sample:
    body = {"prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    num_tokens = 0
    async with client.post("/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:  # one line at a time
            if not raw.startswith(b"data: {"):
                continue
            chunk = json.loads(raw[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                num_tokens = chunk["usage"]["completion_tokens"]
    return _sample(start, first, last, num_tokens)


def http_session(port: int, concurrency: int) -> aiohttp.ClientSession:
    """aiohttp, as `vllm bench serve` uses: its C parser costs the client about what grpc's C core does;
    httpx's pure-Python one cost this client more CPU than the server spent per call, which made the
    HTTP figures the client's (2026-12-07, docs/benchmarks/transports.md)."""
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=60)
    return aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=connector,
                                 timeout=aiohttp.ClientTimeout(total=600))


async def grpc_stream(stub: rpc.GenerationStub, prompt: list[int], output_len: int) -> Sample:
    req = pb.CompletionRequest(
        prompt_token_ids=pb.TokenIds(ids=prompt), max_tokens=output_len, ignore_eos=True, temperature=0
    )
    start = time.perf_counter()
    first = last = None
    num_tokens = 0
    async for chunk in stub.CompleteStream(req):
        if chunk.choices and chunk.choices[0].token_ids:
            last = time.perf_counter()
            first = first or last
        if chunk.HasField("usage"):
            num_tokens = chunk.usage.completion_tokens
    return _sample(start, first, last, num_tokens)


async def run_streams(transport: str, port: int, concurrency: int, prompts: list[list[int]], output_len: int) -> Result:
    queue = list(prompts)
    samples: list[Sample] = []
    async with http_session(port, concurrency) as client, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rpc.GenerationStub(channel)

        async def user() -> None:
            while queue:
                prompt = queue.pop()
                if transport == "http":
                    samples.append(await http_stream(client, prompt, output_len))
                else:
                    samples.append(await grpc_stream(stub, prompt, output_len))

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        return Result(transport, concurrency, time.perf_counter() - start, samples)


async def tokenize_rate(transport: str, port: int, concurrency: int, duration_s: float) -> float:
    text = "The quick brown fox jumps over the lazy dog. " * 4
    count = 0
    deadline = time.perf_counter() + duration_s
    async with http_session(port, concurrency) as client, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rpc.TokenizationStub(channel)

        async def user() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                if transport == "http":
                    async with client.post("/tokenize", json={"prompt": text}) as resp:
                        resp.raise_for_status()
                        await resp.read()
                else:
                    await stub.Tokenize(pb.TokenizeRequest(prompt=text))
                count += 1

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        return count / (time.perf_counter() - start)


async def main_async(args: argparse.Namespace, http_port: int, grpc_port: int) -> None:
    ports = {"http": http_port, "grpc": grpc_port}
    results: dict[tuple[str, int], list[Result]] = {}
    # Warm-up, untimed: one pass at the highest concurrency over each transport. The server's first batches
    # of a size (allocator growth, thread pools, first kernels at that shape) cost far more than later
    # ones, and without this the transport measured first pays it: with --rounds 1 that was always HTTP,
    # which alone made HTTP look 0.7x of gRPC at 64 (2026-12-07, docs/benchmarks/transports.md).
    top = max(args.concurrency)
    for transport in ("http", "grpc"):
        await run_streams(transport, ports[transport], top, _prompts(top, args.input_len, 99), args.output_len)
    for round_index in range(args.rounds):
        order = ("http", "grpc") if round_index % 2 == 0 else ("grpc", "http")
        for concurrency in args.concurrency:
            for transport in order:
                # Prompts of their own per run: the same prompts again would be prefix-cache hits for
                # whichever transport goes second (the cache outlives a run), and cut its TTFT 3-4x.
                seed = 1000 * concurrency + 2 * round_index + (transport == "grpc")
                prompts = _prompts(concurrency * args.requests_per_user, args.input_len, seed=seed)
                result = await run_streams(transport, ports[transport], concurrency, prompts, args.output_len)
                results.setdefault((transport, concurrency), []).append(result)
                print(
                    f"round {round_index} {transport:4s} c={concurrency:3d}: {result.tokens_per_s:7.1f} tok/s, "
                    f"TTFT {result.ttft_ms:7.1f} ms, TPOT {result.tpot_ms:6.1f} ms",
                    flush=True,
                )
    rates: dict[str, list[float]] = {"http": [], "grpc": []}
    for round_index in range(args.rounds):
        order = ("http", "grpc") if round_index % 2 == 0 else ("grpc", "http")
        for transport in order:
            rates[transport].append(
                await tokenize_rate(transport, ports[transport], args.tokenize_concurrency, args.tokenize_seconds)
            )

    print("\n| concurrency | HTTP SSE tok/s | gRPC stream tok/s | gRPC / HTTP | median TTFT HTTP / gRPC | median TPOT HTTP / gRPC |")
    print("|---|---|---|---|---|---|")
    for concurrency in args.concurrency:
        h = results[("http", concurrency)]
        g = results[("grpc", concurrency)]
        h_tps = statistics.mean(r.tokens_per_s for r in h)
        g_tps = statistics.mean(r.tokens_per_s for r in g)
        print(
            f"| {concurrency} | {h_tps:.1f} | {g_tps:.1f} | {g_tps / h_tps:.2f}x | "
            f"{statistics.mean(r.ttft_ms for r in h):.0f} / {statistics.mean(r.ttft_ms for r in g):.0f} ms | "
            f"{statistics.mean(r.tpot_ms for r in h):.1f} / {statistics.mean(r.tpot_ms for r in g):.1f} ms |"
        )
    h_rate, g_rate = statistics.mean(rates["http"]), statistics.mean(rates["grpc"])
    print(
        f"\nTokenize (unary, concurrency {args.tokenize_concurrency}): HTTP {h_rate:.0f} calls/s, "
        f"gRPC {g_rate:.0f} calls/s, gRPC / HTTP {g_rate / h_rate:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_concurrency(parser, [1, 16, 64])
    parser.add_argument("--requests-per-user", type=int, default=2)
    add_lengths(parser)
    add_rounds(parser, 2, help="rounds alternate which transport goes first")
    parser.add_argument("--tokenize-concurrency", type=int, default=16)
    parser.add_argument("--tokenize-seconds", type=float, default=5.0)
    parser.add_argument("--server-arg", action="append", default=[], help="extra `lmserve serve` flag (repeatable)")
    args = parser.parse_args()
    exit_on_sigterm()
    grpc_port = free_port()

    def command(port: int) -> ServerCommand:
        return lmserve_command(port, "--no-safety", *args.server_arg, grpc_port=grpc_port)

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with serving("the server", command, env=env, grace_s=30) as server:
        asyncio.run(main_async(args, server.port, grpc_port))


if __name__ == "__main__":
    main()
