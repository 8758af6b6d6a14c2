"""Per-request deadlines: HTTP's `x-request-timeout` header and `timeout` body field, gRPC's own deadline.

A deadline ends the request and frees its KV blocks; the response says why: finish_reason "timeout" once
tokens have been generated, a 504 (code request_timeout, OpenAI's error shape) before the first one. The
tiny model is slowed through the runner's test-only `fault_hook`, so that a deadline lands mid-request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from lmserve.config import LimitsConfig
from tests.api.conftest import LiveServer
from tests.reliability.conftest import live_server, native, read_sse, tiny_config, wait_idle

PROMPT_IDS = [1, 504, 3123, 314, 2752, 30, 198, 2000, 17, 86]
STEP_S = 0.025  # each forward at least this long: 400 tokens take 10 s or more
BODY = {"prompt": PROMPT_IDS, "max_tokens": 400, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, cache_dir: Path) -> Iterator[LiveServer]:
    with live_server(tiny_config(tiny_llama_dir, cache_dir, LimitsConfig(max_tokens_cap=400))) as live:
        yield live


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    native(server.state).runner.fault_hook = lambda _: time.sleep(STEP_S)
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as client:
        yield client
    native(server.state).runner.fault_hook = None
    wait_idle(server.state, timeout_s=20)  # whatever the test did, its requests ended and their blocks are free


@pytest.fixture
def deadline_s(server: LiveServer, http: httpx.Client) -> float:
    """A deadline that lands after the first tokens and long before the 400th: a few times this machine's
    time to a first token (tens of milliseconds on an idle CI runner, seconds on a busy box)."""
    started = time.monotonic()
    ttft = None
    with http.stream("POST", "/v1/completions", json={**BODY, "max_tokens": 2, "stream": True}) as resp:
        for line in resp.iter_lines():
            if ttft is None and line.startswith('data: {"id"'):
                ttft = time.monotonic() - started
    assert ttft is not None
    return round(min(max(1.5, 5 * ttft), 4.0), 2)


def test_a_stream_past_its_timeout_ends_with_finish_reason_timeout(
    server: LiveServer, http: httpx.Client, deadline_s: float
) -> None:
    headers = {"x-request-timeout": str(deadline_s)}
    with http.stream("POST", "/v1/completions", json={**BODY, "stream": True}, headers=headers) as resp:
        assert resp.status_code == 200
        sse = read_sse(resp)
    choices = [c for e in sse.events for c in e["choices"]]
    assert sse.done_last and all("error" not in e for e in sse.events)
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["timeout"] == [choices[-1]["finish_reason"]]
    assert 0 < sum(1 for c in choices if c["text"]) < 400
    wait_idle(server.state, timeout_s=2)  # aborted, its blocks freed at once


def test_a_completion_past_its_body_timeout_returns_what_it_has(http: httpx.Client, deadline_s: float) -> None:
    resp = http.post("/v1/completions", json={**BODY, "timeout": deadline_s})
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["choices"][0]["finish_reason"] == "timeout"
    assert 0 < data["usage"]["completion_tokens"] < 400 and data["choices"][0]["text"]
    chat = http.post(  # a chat prompt is longer: more room for its first token
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400, "ignore_eos": True, "timeout": 2 * deadline_s},
    )
    assert chat.status_code == 200 and chat.json()["choices"][0]["finish_reason"] == "timeout"


def test_the_smaller_of_header_and_body_timeout_wins(http: httpx.Client, deadline_s: float) -> None:
    resp = http.post("/v1/completions", json={**BODY, "timeout": 60}, headers={"x-request-timeout": str(deadline_s)})
    assert resp.json()["choices"][0]["finish_reason"] == "timeout"
    assert resp.json()["usage"]["completion_tokens"] < 400
    resp = http.post("/v1/completions", json={**BODY, "timeout": deadline_s}, headers={"x-request-timeout": "60"})
    assert resp.json()["choices"][0]["finish_reason"] == "timeout"


def test_a_timeout_before_the_first_token_is_a_504(server: LiveServer, http: httpx.Client) -> None:
    native(server.state).runner.fault_hook = lambda _: time.sleep(5.0)  # the first step outlasts the deadline
    for stream in (False, True):
        started = time.monotonic()
        resp = http.post("/v1/completions", json={**BODY, "stream": stream}, headers={"x-request-timeout": "0.4"})
        assert resp.status_code == 504, resp.text
        error = resp.json()["error"]
        assert (error["code"], error["type"]) == ("request_timeout", "timeout_error")
        assert "0.4 s" in error["message"]
        assert time.monotonic() - started < 4.0  # answered at the deadline, not after the slow step


def test_bad_timeouts_are_400(http: httpx.Client) -> None:
    resp = http.post("/v1/completions", json=BODY, headers={"x-request-timeout": "soon"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "x-request-timeout"
    for bad in ("-1", "0", "nan", "inf"):
        # With a body timeout too (the smaller counts): a bad header is still refused, never ignored.
        for body in (BODY, {**BODY, "timeout": 30}):
            resp = http.post("/v1/completions", json=body, headers={"x-request-timeout": bad})
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "x-request-timeout", (bad, body)
    resp = http.post("/v1/completions", json={**BODY, "timeout": 0})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "timeout"


def test_a_grpc_deadline_ends_the_stream_and_frees_its_blocks(
    server: LiveServer, http: httpx.Client, deadline_s: float
) -> None:
    async def go() -> tuple[int, grpc.aio.AioRpcError]:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = rpc.GenerationStub(channel)
            req = pb.CompletionRequest(prompt_token_ids=pb.TokenIds(ids=PROMPT_IDS), max_tokens=400, ignore_eos=True)
            num_tokens = 0
            try:
                async for chunk in stub.CompleteStream(req, metadata=server.grpc_metadata, timeout=deadline_s):
                    num_tokens += sum(len(c.token_ids) for c in chunk.choices)
            except grpc.aio.AioRpcError as exc:
                return num_tokens, exc
            raise AssertionError("the stream outlived its deadline")

    num_tokens, exc = asyncio.run(go())
    assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and 0 < num_tokens < 400
    wait_idle(server.state, timeout_s=2)


def test_a_grpc_deadline_ends_a_unary_call_and_frees_its_blocks(
    server: LiveServer, http: httpx.Client, deadline_s: float
) -> None:
    async def go() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = rpc.GenerationStub(channel)
            req = pb.CompletionRequest(prompt_token_ids=pb.TokenIds(ids=PROMPT_IDS), max_tokens=400, ignore_eos=True)
            try:
                await stub.Complete(req, metadata=server.grpc_metadata, timeout=deadline_s)
            except grpc.aio.AioRpcError as exc:
                return exc
            raise AssertionError("the call outlived its deadline")

    started = time.monotonic()
    exc = asyncio.run(go())
    assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < deadline_s + 2
    wait_idle(server.state, timeout_s=2)
