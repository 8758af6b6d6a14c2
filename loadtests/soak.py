"""Soak: resident memory of one lmserve server over many mixed requests, HTTP and gRPC.

    .venv/bin/python loadtests/soak.py [--requests 2000] [--warmup 200] [--concurrency 8] [--tolerance 0.05]

Starts `lmserve serve` (the bundled generation and embedding models) on loopback with both transports, then
from this process sends --warmup requests, takes the server's resident set size (VmRSS of its process) as
the baseline, and sends --requests more, reading the RSS every --sample-every requests. The requests cycle
through a fixed mix on both transports: completions, streamed chat, embeddings, tokenize, a request the
server must refuse (400 / INVALID_ARGUMENT), and a stream the client abandons midway (a disconnect / a gRPC
cancel), so that the paths that could leak (aborts, errors, freed KV blocks) run as often as the happy ones.

Prints one line per sample and, last, a summary line starting `SOAK RESULT: PASS` or `SOAK RESULT: FAIL`:
PASS when no request failed unexpectedly (a 5xx, INTERNAL/UNKNOWN, a broken stream) and the largest RSS
after warm-up stayed within --tolerance of the baseline. The exit status is 0 on PASS, 1 on FAIL. Bounded:
every request has a timeout and the whole run stops at --max-seconds (which counts as FAIL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the stubs in service/lmserve/api/proto, when run as a script from anywhere
sys.path.insert(0, str(ROOT / "loadtests"))

from lmload.servers import free_port, launch, stop, wait_ready  # noqa: E402
from lmserve.api.proto import lmserve_pb2 as pb  # noqa: E402
from lmserve.api.proto import lmserve_pb2_grpc as rpc  # noqa: E402

REQUEST_TIMEOUT_S = 120.0
TOPICS = ["the sea", "a red bicycle", "winter in Oslo", "compilers", "bread", "a lost key", "jazz", "the moon"]


@dataclass
class Tally:
    """What the run saw; `unexpected` holds one line per request that failed in a way it must not."""

    by_kind: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)

    def fail(self, kind: str, detail: str) -> None:
        self.unexpected.append(f"{kind}: {detail}"[:300])


@dataclass(frozen=True)
class Sample:
    num_done: int
    elapsed_s: float
    rss_bytes: int


def rss_bytes(pid: int) -> int:
    """The process's resident set size, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- the request mix ---------------------------------------------------------------------------------------


class Mix:
    """One callable per kind of request; each records its outcome in the tally and never raises."""

    def __init__(self, http: httpx.AsyncClient, channel: grpc.aio.Channel, max_tokens: int, tally: Tally, seed: int) -> None:
        self.http = http
        self.generation = rpc.GenerationStub(channel)
        self.embeddings = rpc.EmbeddingsStub(channel)
        self.tokenization = rpc.TokenizationStub(channel)
        self.max_tokens = max_tokens
        self.tally = tally
        self.rng = random.Random(seed)
        self.kinds: list[tuple[str, Callable[[str], Awaitable[None]]]] = [
            ("http completion", self.http_completion),
            ("grpc chat stream", self.grpc_chat_stream),
            ("http embeddings", self.http_embeddings),
            ("grpc tokenize", self.grpc_tokenize),
            ("http chat stream", self.http_chat_stream),
            ("grpc complete", self.grpc_complete),
            ("grpc embed", self.grpc_embed),
            ("http tokenize", self.http_tokenize),
            ("http refused", self.http_refused),
            ("grpc refused", self.grpc_refused),
            ("http abandoned stream", self.http_abandoned),
            ("grpc cancelled stream", self.grpc_cancelled),
        ]

    def _prompt(self) -> str:
        return f"Write two sentences about {self.rng.choice(TOPICS)}."

    async def run(self, index: int) -> None:
        """Request `index` of the mix. Its id (x-request-id, header or metadata) is `soak-<index>`, so that
        a failure's line here finds the server's access line for it."""
        kind, call = self.kinds[index % len(self.kinds)]
        rid = f"soak-{index}"
        started = time.monotonic()
        try:
            await asyncio.wait_for(call(rid), REQUEST_TIMEOUT_S)
            self.tally.by_kind[kind] += 1
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the soak
            self.tally.fail(kind, f"{rid} after {time.monotonic() - started:.1f} s: {type(exc).__name__}: {exc}")

    @staticmethod
    def _md(rid: str) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", rid),)

    async def _post(self, rid: str, path: str, body: dict[str, object], expect: int = 200) -> httpx.Response:
        resp = await self.http.post(path, json=body, headers={"x-request-id": rid})
        if resp.status_code != expect:
            raise RuntimeError(f"{path} -> {resp.status_code} (expected {expect}): {resp.text[:200]}")
        return resp

    async def http_completion(self, rid: str) -> None:
        resp = await self._post(rid, "/v1/completions", {"prompt": self._prompt(), "max_tokens": self.max_tokens})
        if not resp.json()["choices"][0]["finish_reason"]:
            raise RuntimeError("no finish_reason")

    async def http_chat_stream(self, rid: str) -> None:
        body = {"messages": [{"role": "user", "content": self._prompt()}], "max_tokens": self.max_tokens, "stream": True}
        async with self.http.stream("POST", "/v1/chat/completions", json=body, headers={"x-request-id": rid}) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"chat stream -> {resp.status_code}")
            lines = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
        if lines[-1] != "data: [DONE]" or any('"error"' in line for line in lines):
            raise RuntimeError(f"stream ended badly: {lines[-1][:100]}")

    async def http_embeddings(self, rid: str) -> None:
        resp = await self._post(rid, "/v1/embeddings", {"input": [self._prompt() for _ in range(self.rng.randint(1, 8))]})
        if not resp.json()["data"]:
            raise RuntimeError("no vectors")

    async def http_tokenize(self, rid: str) -> None:
        tokens = (await self._post(rid, "/tokenize", {"prompt": self._prompt()})).json()["tokens"]
        await self._post(rid, "/detokenize", {"tokens": tokens})

    async def http_refused(self, rid: str) -> None:
        body = self.rng.choice(
            [{"prompt": "  ", "max_tokens": 2}, {"prompt": "x", "temperature": -1}, {"prompt": [10**9]}, {"prompt": "x", "bogus": 1}]
        )
        await self._post(rid, "/v1/completions", body, expect=400)

    async def http_abandoned(self, rid: str) -> None:
        body = {"prompt": self._prompt(), "max_tokens": self.max_tokens * 4, "stream": True, "ignore_eos": True}
        async with self.http.stream("POST", "/v1/completions", json=body, headers={"x-request-id": rid}) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"stream -> {resp.status_code}")
            # Leave as soon as the response starts (a stream's headers go out with its first token): the
            # server must abort the request and free it. Waiting for the first text line would not do: the
            # safety filter may hold the text until the very end.

    async def grpc_complete(self, rid: str) -> None:
        reply = await self.generation.Complete(
            pb.CompletionRequest(prompt=self._prompt(), max_tokens=self.max_tokens), metadata=self._md(rid)
        )
        if not reply.choices[0].finish_reason:
            raise RuntimeError("no finish_reason")

    async def grpc_chat_stream(self, rid: str) -> None:
        req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=self._prompt())], max_tokens=self.max_tokens)
        chunks = [chunk async for chunk in self.generation.ChatStream(req, metadata=self._md(rid))]
        if not chunks or not chunks[-1].HasField("usage"):
            raise RuntimeError("stream ended without usage")

    async def grpc_embed(self, rid: str) -> None:
        reply = await self.embeddings.Embed(
            pb.EmbedRequest(input=[self._prompt() for _ in range(self.rng.randint(1, 8))]), metadata=self._md(rid)
        )
        if not reply.data:
            raise RuntimeError("no vectors")

    async def grpc_tokenize(self, rid: str) -> None:
        reply = await self.tokenization.Tokenize(pb.TokenizeRequest(prompt=self._prompt()), metadata=self._md(rid))
        await self.tokenization.Detokenize(pb.DetokenizeRequest(tokens=reply.tokens), metadata=self._md(rid))

    async def grpc_refused(self, rid: str) -> None:
        try:
            await self.generation.Complete(pb.CompletionRequest(prompt=" \n", max_tokens=2), metadata=self._md(rid))
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise RuntimeError(f"refused with {error.code().name}, not INVALID_ARGUMENT") from None
            return
        raise RuntimeError("a whitespace-only prompt was served")

    async def grpc_cancelled(self, rid: str) -> None:
        req = pb.CompletionRequest(prompt=self._prompt(), max_tokens=self.max_tokens * 4, ignore_eos=True)
        call = self.generation.CompleteStream(req, metadata=self._md(rid))
        # Cancel at the first message or after 0.05-0.5 s, whichever comes first (the safety filter may
        # hold every message to the end): some are cancelled queued or in prefill, most while decoding.
        with contextlib.suppress(asyncio.TimeoutError, StopAsyncIteration):
            await asyncio.wait_for(anext(aiter(call)), self.rng.uniform(0.05, 0.5))
        call.cancel()


# -- the run -----------------------------------------------------------------------------------------------


async def drive(mix: Mix, start: int, count: int, concurrency: int, on_done: Callable[[int], None], deadline: float) -> bool:
    """Send requests start..start+count-1 over `concurrency` workers; False when the deadline cut it short."""
    indices = iter(range(start, start + count))

    async def worker() -> None:
        for index in indices:
            if time.monotonic() > deadline:
                return
            await mix.run(index)
            on_done(index)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.monotonic() <= deadline


async def soak(args: argparse.Namespace, pid: int, http_port: int, grpc_port: int) -> dict[str, object]:
    tally = Tally()
    samples: list[Sample] = []
    deadline = time.monotonic() + args.max_seconds
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else None
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", headers=headers, timeout=REQUEST_TIMEOUT_S) as http:
        interceptors = [_Metadata(metadata)] if metadata else None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}", interceptors=interceptors) as channel:
            mix = Mix(http, channel, args.max_tokens, tally, args.seed)
            started = time.monotonic()
            finished_in_time = await drive(mix, 0, args.warmup, args.concurrency, lambda i: None, deadline)
            baseline = rss_bytes(pid)
            print(f"warm-up: {args.warmup} requests in {time.monotonic() - started:.0f} s; baseline RSS {baseline / 2**20:.1f} MiB", flush=True)
            counter = itertools.count(1)
            soak_started = time.monotonic()

            def on_done(_: int) -> None:
                done = next(counter)
                if done % args.sample_every == 0 or done == args.requests:
                    sample = Sample(done, time.monotonic() - soak_started, rss_bytes(pid))
                    samples.append(sample)
                    growth = sample.rss_bytes / baseline - 1
                    print(
                        f"{done:6d} requests  {sample.elapsed_s:7.0f} s  RSS {sample.rss_bytes / 2**20:8.1f} MiB  "
                        f"{growth:+6.1%} vs baseline  unexpected failures {len(tally.unexpected)}",
                        flush=True,
                    )

            if finished_in_time:
                finished_in_time = await drive(mix, args.warmup, args.requests, args.concurrency, on_done, deadline)
    peak = max((s.rss_bytes for s in samples), default=baseline)
    final = samples[-1].rss_bytes if samples else baseline
    num_done = samples[-1].num_done if samples else 0
    within = peak <= baseline * (1 + args.tolerance)
    passed = finished_in_time and within and not tally.unexpected and num_done == args.requests
    return {
        "passed": passed,
        "finished_in_time": finished_in_time,
        "requests": num_done,
        "warmup": args.warmup,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "final_rss_bytes": final,
        "peak_growth": peak / baseline - 1,
        "final_growth": final / baseline - 1,
        "tolerance": args.tolerance,
        "within_tolerance": within,
        "by_kind": dict(tally.by_kind),
        "unexpected": tally.unexpected,
        "samples": [asdict(s) for s in samples],
    }


class _Metadata(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Adds the API key to every gRPC call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _with(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(metadata=(*(details.metadata or ()), *self.metadata))  # type: ignore[attr-defined]

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with(details), request)

    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with(details), request)


def start_server(http_port: int, grpc_port: int, extra: list[str], api_key: str | None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "lmserve", "serve", "--host", "127.0.0.1", "--port", str(http_port),
           "--grpc-port", str(grpc_port), "--log-level", "warning", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"LMSERVE_API_KEYS": api_key} if api_key else {})}
    proc = launch(cmd, env=env, cwd=ROOT)
    wait_ready(proc, f"http://127.0.0.1:{http_port}/readyz", 600, "the server")
    return proc


def summary_line(result: dict[str, object]) -> str:
    mib = 2**20
    verdict = "PASS" if result["passed"] else "FAIL"
    return (
        f"SOAK RESULT: {verdict}: {result['requests']} requests after {result['warmup']} warm-up, "
        f"{len(result['unexpected'])} unexpected failures; RSS baseline {result['baseline_rss_bytes'] / mib:.1f} MiB, "  # type: ignore[operator]
        f"peak {result['peak_rss_bytes'] / mib:.1f} MiB ({result['peak_growth']:+.1%}), "  # type: ignore[operator]
        f"final {result['final_rss_bytes'] / mib:.1f} MiB ({result['final_growth']:+.1%}); "  # type: ignore[operator]
        f"limit +{result['tolerance']:.0%}"
        + ("" if result["finished_in_time"] else "; stopped at --max-seconds")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests measured after the warm-up")
    parser.add_argument("--warmup", type=int, default=200, help="requests before the baseline RSS is taken")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16, help="per generation (abandoned streams ask for 4x)")
    parser.add_argument("--sample-every", type=int, default=100, help="read the RSS every this many requests")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed peak RSS growth over the baseline")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop (and fail) after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None, help="sent as Bearer on both transports, and given to the server")
    parser.add_argument("--json", type=Path, default=None, help="also write the full result here")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `lmserve serve` flag (repeatable)")
    args = parser.parse_args()

    http_port, grpc_port = free_port(), free_port()
    proc = start_server(http_port, grpc_port, list(args.server_arg), args.api_key)
    try:
        result = asyncio.run(soak(args, proc.pid, http_port, grpc_port))
    finally:
        stop(proc, grace_s=60)
    for line in result["unexpected"][:20]:  # type: ignore[index]
        print(f"unexpected: {line}")
    print(f"by kind: {json.dumps(result['by_kind'], sort_keys=True)}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(summary_line(result), flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
