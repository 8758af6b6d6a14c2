"""Streamed chat with the default safety policy against `--no-safety`, in one run on one machine.

    .venv/bin/python benchmarks/safety_stream.py [--concurrency 1 16] [--rounds 2] [--max-tokens 128]

Starts `lmserve serve` on the bundled model twice (the default policy and `--no-safety`; `--policy` adds a
third), keeps them up together, and in each round streams the same chat questions through each in turn
(alternating the order, so the machine's drift hits both alike) at every concurrency: each question once per user slot, greedy, `ignore_eos` so both servers write the same number
of tokens. Per server and concurrency it prints the median time to first text (the first chunk with
content, not the role chunk), characters per content chunk (all content over all content chunks), output
tokens/s (completion tokens over the load's wall time), how many streams the filter ended with
content_filter, their medians over rounds and the medians of each round's ratio default / off. Bounded: a fixed number of requests per load, each with a
600 s client timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchkit.cli import add_concurrency, add_rounds
from benchkit.server import Server, exit_on_sigterm, lmserve_command, start_server

QUESTIONS = (
    "Explain how a rainbow forms.", "What makes bread rise?", "Describe a walk in the park.",
    "Why is the sky blue?", "How do bees make honey?", "Give me tips for a good night's sleep.",
    "What is photosynthesis?", "How does a bicycle stay upright?", "Tell me about the moon landing.",
    "How do I start learning the guitar?", "What causes the seasons?", "Describe the water cycle.",
    "Why do cats purr?", "How does a refrigerator keep food cold?", "What is a black hole?",
    "Suggest a plan for a rainy Sunday.", "How do vaccines work?", "What is the history of chess?",
    "How do airplanes fly?", "Write a short story about a lighthouse keeper.", "What is machine learning?",
    "How do volcanoes erupt?", "Describe the city of Paris.", "How should I prepare for a job interview?",
    "What are the benefits of walking?", "How do tides work?", "Explain how a compass works.",
    "What is the tallest mountain and how was it measured?", "How do plants grow from seeds?",
    "Tell me about the Roman Empire.", "How does recycling help the environment?", "What is a good breakfast?",
)


@dataclass(frozen=True)
class Stream:
    first_text_s: float
    num_content_chunks: int
    num_chars: int
    completion_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class Load:
    wall_s: float
    streams: list[Stream]

    @property
    def first_text_ms(self) -> float:
        return 1000 * statistics.median(s.first_text_s for s in self.streams)

    @property
    def chars_per_chunk(self) -> float:
        return sum(s.num_chars for s in self.streams) / max(1, sum(s.num_content_chunks for s in self.streams))

    @property
    def tokens_per_s(self) -> float:
        return sum(s.completion_tokens for s in self.streams) / self.wall_s

    @property
    def num_filtered(self) -> int:
        return sum(s.finish_reason == "content_filter" for s in self.streams)


async def chat_stream(client: httpx.AsyncClient, question: str, max_tokens: int) -> Stream:
    body = {
        "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    num_chunks = num_chars = tokens = 0
    finish = ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                content = choice["delta"].get("content")
                if content:
                    first = first if first is not None else time.perf_counter()
                    num_chunks += 1
                    num_chars += len(content)
                finish = choice.get("finish_reason") or finish
    if first is None:  # blocked before any text: count the end as its first text
        first = time.perf_counter()
    return Stream(first - start, num_chunks, num_chars, tokens, finish)


async def run_load(port: int, concurrency: int, requests: int, max_tokens: int) -> Load:
    queue = [QUESTIONS[i % len(QUESTIONS)] for i in range(requests)]
    streams: list[Stream] = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:

        async def user() -> None:
            while queue:
                streams.append(await chat_stream(client, queue.pop(0), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        return Load(time.perf_counter() - start, streams)


def _label(mode: str) -> str:
    return mode if mode in ("default", "off") else Path(mode).stem[:9]


def start(mode: str) -> Server:
    """A server with the default policy, without the filter (`off`), or with the policy file `mode`; warmed up."""
    flags: list[str] = []
    if mode == "off":
        flags.append("--no-safety")
    elif mode != "default":
        flags += ["--safety-policy", mode]
    server = start_server(
        f"the server ({mode})", lambda port: lmserve_command(port, *flags), env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    asyncio.run(run_load(server.port, 2, 2, 8))  # warm-up
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_concurrency(parser, [1, 16])
    parser.add_argument("--requests", type=int, default=12, help="streams per load (at least 2 per user)")
    parser.add_argument("--max-tokens", type=int, default=128)
    add_rounds(parser, 4)
    parser.add_argument("--policy", type=Path, default=None, help="a third server with this policy file")
    args = parser.parse_args()
    exit_on_sigterm()
    modes = ["default", "off"] + ([str(args.policy)] if args.policy is not None else [])
    servers: dict[str, Server] = {}
    runs: dict[tuple[str, int], list[Load]] = {}
    try:
        for mode in modes:
            servers[mode] = start(mode)
        for round_index in range(args.rounds):
            for concurrency in args.concurrency:
                # Both servers stay up (an idle one costs nothing); loads alternate, so drift hits both alike.
                order = modes if round_index % 2 == 0 else modes[::-1]
                for mode in order:
                    requests = max(args.requests, concurrency * 2)
                    load = asyncio.run(run_load(servers[mode].port, concurrency, requests, args.max_tokens))
                    runs.setdefault((mode, concurrency), []).append(load)
                    print(
                        f"round {round_index} {_label(mode):9s} c={concurrency:<3d} first text "
                        f"{load.first_text_ms:7.1f} ms, {load.chars_per_chunk:5.1f} chars/chunk, "
                        f"{load.tokens_per_s:6.1f} tok/s, {load.num_filtered} filtered of {len(load.streams)}",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()
    print(f"\n{'c':>3} {'policy':<9} {'first text ms':>13} {'chars/chunk':>11} {'tok/s':>7}  (medians over rounds)")
    for concurrency in args.concurrency:
        for mode in modes:
            loads = runs[(mode, concurrency)]
            print(
                f"{concurrency:>3} {_label(mode):<9} {statistics.median(x.first_text_ms for x in loads):>13.1f} "
                f"{statistics.median(x.chars_per_chunk for x in loads):>11.1f} "
                f"{statistics.median(x.tokens_per_s for x in loads):>7.1f}"
            )
        for mode in modes[:1] + modes[2:]:
            pairs = list(zip(runs[(mode, concurrency)], runs[("off", concurrency)], strict=True))
            print(
                f"{concurrency:>3} {_label(mode) + '/off':<13} "
                f"{statistics.median(a.first_text_ms / b.first_text_ms for a, b in pairs):>12.2f}x "
                f"{statistics.median(a.chars_per_chunk / b.chars_per_chunk for a, b in pairs):>10.2f}x "
                f"{statistics.median(a.tokens_per_s / b.tokens_per_s for a, b in pairs):>6.3f}x  (median of round ratios)"
            )


if __name__ == "__main__":
    main()
