"""Request ids, the access line and what the logs may hold, against the real server.

The server runs in a thread of this process, so its log records reach a handler added to the root logger
here: the same `make_handler` that `lmserve serve` installs, writing to a buffer that is parsed back.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import httpx
import pytest

from lmserve.logs import ACCESS_LOGGER, make_handler
from tests.api.conftest import MAX_BODY_BYTES, LiveServer, Servers

MODEL = "smollm2-135m-instruct"
HEX32 = re.compile(r"^[0-9a-f]{32}$")


class LogCapture:
    """Every line the root handler would write while it is installed."""

    def __init__(self, log_format: str) -> None:
        self.stream = io.StringIO()
        self.handler = make_handler(log_format, self.stream)
        self.handler.setLevel(logging.DEBUG)

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]

    def access_lines(self, request_id: str, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        """The access lines for `request_id`, once there is one: the server logs it after the response
        has gone out, so it can land a moment after the client has read everything."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [e for e in self.entries() if e["logger"] == ACCESS_LOGGER and e.get("request_id") == request_id]
            if found:
                time.sleep(0.2)  # room for a (wrong) second line to show up
                return [e for e in self.entries() if e["logger"] == ACCESS_LOGGER and e.get("request_id") == request_id]
            time.sleep(0.02)
        raise AssertionError(f"no access line for {request_id}")

    def access(self, request_id: str) -> dict[str, Any]:
        (line,) = self.access_lines(request_id)
        return line


def _wait_idle(servers: Servers) -> None:
    """No request of an earlier test is still running (and logging) on any server."""
    deadline = time.monotonic() + 30
    states = [servers.main.state, servers.limited.state, servers.fuzz.state]
    while any(s.lifecycle.in_flight for s in states) and time.monotonic() < deadline:
        time.sleep(0.02)


@contextmanager
def capture_logs(servers: Servers, log_format: str) -> Iterator[LogCapture]:
    _wait_idle(servers)
    capture = LogCapture(log_format)
    loggers = [logging.getLogger("lmserve")]
    saved_levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)  # the debug lines too: they must carry the id as well
    root = logging.getLogger()
    root.addHandler(capture.handler)
    try:
        yield capture
    finally:
        root.removeHandler(capture.handler)
        for logger, level in zip(loggers, saved_levels, strict=True):
            logger.setLevel(level)


@pytest.fixture
def logs(servers: Servers) -> Iterator[LogCapture]:
    with capture_logs(servers, "json") as capture:
        yield capture


@pytest.fixture
def log_prompts(server: LiveServer) -> Iterator[None]:
    """The main server with log_prompts on (read per request), for one test."""
    config = server.state.config
    server.state.config = replace(config, log_prompts=True)
    try:
        yield
    finally:
        server.state.config = config


def _new_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def _sse_data(resp: httpx.Response) -> list[Any]:
    return [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]


# -- the id ----------------------------------------------------------------------------------------------


def test_request_id_is_echoed_when_given(http: httpx.Client) -> None:
    for value in ("client-id-42", "x" * 128, "with spaces and :/=+"):
        resp = http.get("/v1/models", headers={"x-request-id": value})
        assert resp.status_code == 200 and resp.headers["x-request-id"] == value


def test_request_id_is_generated_when_absent(http: httpx.Client) -> None:
    first = http.get("/v1/models").headers["x-request-id"]
    second = http.get("/v1/models").headers["x-request-id"]
    assert HEX32.match(first) and HEX32.match(second) and first != second


@pytest.mark.parametrize("value", ["x" * 129, "caf\u00e9".encode(), b"tab\there"])
def test_invalid_request_id_is_replaced(http: httpx.Client, value: str | bytes) -> None:
    resp = http.get("/v1/models", headers={"x-request-id": value})
    assert resp.status_code == 200
    assert HEX32.match(resp.headers["x-request-id"]), resp.headers["x-request-id"]
    assert len(resp.headers.get_list("x-request-id")) == 1


def test_request_id_on_error_responses(server: LiveServer, http: httpx.Client) -> None:
    cases: list[tuple[int, str, httpx.Response]] = []
    with httpx.Client(base_url=server.base_url, headers={"Authorization": "Bearer wrong"}) as wrong_key:
        cases.append((401, "a401", wrong_key.get("/v1/models", headers={"x-request-id": "a401"})))
    body = {"model": MODEL, "prompt": "Hi", "temperature": 5}
    cases.append((400, "a400", http.post("/v1/completions", json=body, headers={"x-request-id": "a400"})))
    body = {"model": "no-such-model", "prompt": "Hi"}
    cases.append((404, "a404", http.post("/v1/completions", json=body, headers={"x-request-id": "a404"})))
    cases.append((404, "b404", http.get("/no/such/route", headers={"x-request-id": "b404"})))
    big = {"model": MODEL, "prompt": "a" * MAX_BODY_BYTES}
    cases.append((413, "a413", http.post("/v1/completions", json=big, headers={"x-request-id": "a413"})))
    for status, request_id, resp in cases:
        assert resp.status_code == status, resp.text
        assert set(resp.json()) == {"error"}
        assert resp.headers.get_list("x-request-id") == [request_id]


def test_request_id_on_streams(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers={"x-request-id": "stream-1"}) as resp:
        assert resp.headers.get_list("x-request-id") == ["stream-1"]
        chunks = _sse_data(resp)
    assert chunks and {c["id"] for c in chunks} == {"cmpl-stream-1"}  # the request id behind OpenAI's prefix
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert HEX32.match(resp.headers["x-request-id"])
        resp.read()


def test_one_id_per_request_on_both_transports(server: LiveServer, http: httpx.Client, logs: LogCapture) -> None:
    """The completion's id is `cmpl-`/`chatcmpl-` + the request id, so a response alone finds its access
    line; a request without an id of its own gets a fresh one, used the same way."""
    import asyncio

    import grpc

    from lmserve.api.proto import lmserve_pb2 as pb
    from lmserve.api.proto import lmserve_pb2_grpc as rpc

    given = _new_id()
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, headers={"x-request-id": given})
    assert resp.json()["id"] == f"cmpl-{given}" and resp.headers["x-request-id"] == given
    assert logs.access(given)["response_id"] == f"cmpl-{given}"

    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    fresh = chat.headers["x-request-id"]
    assert HEX32.match(fresh) and chat.json()["id"] == f"chatcmpl-{fresh}"
    assert logs.access(fresh)["response_id"] == f"chatcmpl-{fresh}"

    async def over_grpc() -> tuple[str, str]:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = rpc.GenerationStub(channel)
            metadata = server.grpc_metadata + (("x-request-id", given + "-g"),)
            unary = await stub.Complete(pb.CompletionRequest(model=MODEL, prompt="Hi", max_tokens=2), metadata=metadata)
            chats = stub.ChatStream(
                pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(role="user", content="Hi")], max_tokens=2),
                metadata=server.grpc_metadata + (("x-request-id", given + "-gs"),),
            )
            ids = {chunk.id async for chunk in chats}
            assert len(ids) == 1
            return unary.id, ids.pop()

    unary_id, stream_id = asyncio.run(over_grpc())
    assert (unary_id, stream_id) == (f"cmpl-{given}-g", f"chatcmpl-{given}-gs")
    assert logs.access(given + "-g")["response_id"] == unary_id


# -- the access line -------------------------------------------------------------------------------------


def test_one_access_line_with_the_usage_of_a_completion(http: httpx.Client, logs: LogCapture) -> None:
    request_id = _new_id()
    body = {"model": MODEL, "prompt": ["Once upon", "The sky is"], "max_tokens": 5, "n": 2, "ignore_eos": True}
    resp = http.post("/v1/completions", json=body, headers={"x-request-id": request_id})
    assert resp.status_code == 200
    usage = resp.json()["usage"]
    line = logs.access(request_id)
    assert line["msg"] == "POST /v1/completions 200"
    assert line["level"] == "INFO"
    assert (line["method"], line["path"], line["status"], line["transport"]) == ("POST", "/v1/completions", 200, "http")
    assert line["prompt_tokens"] == usage["prompt_tokens"]
    assert line["completion_tokens"] == usage["completion_tokens"] == 20
    assert line["finish_reasons"] == ["length"] * 4
    assert line["cached_tokens"] >= 0 and "error" not in line
    assert 0 < line["ttft_ms"] <= line["latency_ms"]
    assert "prompt" not in line and "outputs" not in line


def test_one_access_line_when_a_chat_stream_ends(http: httpx.Client, logs: LogCapture) -> None:
    request_id = _new_id()
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"x-request-id": request_id}) as resp:
        chunks = _sse_data(resp)
    usage = chunks[-1]["usage"]
    finish = next(c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    line = logs.access(request_id)
    assert (line["path"], line["status"]) == ("/v1/chat/completions", 200)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert line["finish_reasons"] == [finish]


def test_access_line_when_a_stream_client_leaves(server: LiveServer, logs: LogCapture) -> None:
    request_id = _new_id()
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body, headers={"x-request-id": request_id}) as resp:
            for n, line in enumerate(line for line in resp.iter_lines() if line.startswith("data: {")):
                if n == 2:
                    break
    line = logs.access(request_id)
    assert line["status"] == 200
    assert line["finish_reasons"] == ["abort"]
    assert 3 <= line["completion_tokens"] < 200


def test_access_line_of_embeddings(http: httpx.Client, logs: LogCapture) -> None:
    request_id = _new_id()
    resp = http.post("/v1/embeddings", json={"input": ["hello world", "a b c"]}, headers={"x-request-id": request_id})
    assert resp.status_code == 200
    line = logs.access(request_id)
    assert line["prompt_tokens"] == resp.json()["usage"]["prompt_tokens"]
    assert "completion_tokens" not in line and "finish_reasons" not in line


def test_access_lines_of_errors(server: LiveServer, http: httpx.Client, logs: LogCapture) -> None:
    with httpx.Client(base_url=server.base_url, headers={"Authorization": "Bearer wrong"}) as wrong_key:
        wrong_key.get("/v1/models", headers={"x-request-id": "err-401"})
    http.post("/v1/completions", json={"prompt": "Hi", "n": 99}, headers={"x-request-id": "err-400"})
    http.get("/livez", headers={"x-request-id": "ok-probe"})
    assert {k: logs.access("err-401")[k] for k in ("status", "error", "path")} == {
        "status": 401, "error": "invalid_api_key", "path": "/v1/models"
    }
    assert {k: logs.access("err-400")[k] for k in ("status", "error")} == {"status": 400, "error": "invalid_value"}
    probe = logs.access("ok-probe")
    assert probe["status"] == 200 and "error" not in probe and "prompt_tokens" not in probe


def test_every_line_of_a_request_carries_its_id(http: httpx.Client, logs: LogCapture) -> None:
    request_id = _new_id()
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3}
    assert http.post("/v1/completions", json=body, headers={"x-request-id": request_id}).status_code == 200
    logs.access(request_id)
    ours = [e for e in logs.entries() if e["logger"].startswith("lmserve.")]
    names = {e["logger"] for e in ours}
    assert {"lmserve.api.stream", ACCESS_LOGGER} <= names  # the debug lines of the request and its access line
    assert len(ours) >= 3
    assert [e for e in ours if e.get("request_id") != request_id] == []


# -- prompts and outputs ---------------------------------------------------------------------------------


def test_prompts_and_outputs_are_not_logged_by_default(http: httpx.Client, logs: LogCapture) -> None:
    marker = f"secret-{uuid.uuid4().hex[:8]}"
    request_id = _new_id()
    resp = http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": f"Repeat {marker}"}], "max_tokens": 8, "temperature": 0},
        headers={"x-request-id": request_id},
    )
    output = resp.json()["choices"][0]["message"]["content"]
    line = logs.access(request_id)
    assert "prompt" not in line and "outputs" not in line
    text = "\n".join(logs.lines())
    assert marker not in text
    assert len(output) >= 10 and json.dumps(output)[1:-1] not in text


def test_prompts_and_outputs_are_logged_when_enabled(http: httpx.Client, logs: LogCapture, log_prompts: None) -> None:
    marker = f"secret-{uuid.uuid4().hex[:8]}"
    request_id = _new_id()
    body = {"model": MODEL, "prompt": f"Repeat {marker}", "max_tokens": 6, "n": 2, "seed": 3, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers={"x-request-id": request_id}) as resp:
        chunks = _sse_data(resp)
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
    line = logs.access(request_id)
    assert line["prompt"] == f"Repeat {marker}"
    assert line["outputs"] == texts
    messages = [{"role": "user", "content": marker}]
    request_id = _new_id()
    body = {"messages": messages, "max_tokens": 2}
    http.post("/v1/chat/completions", json=body, headers={"x-request-id": request_id})
    assert logs.access(request_id)["prompt"] == messages


# -- text format -----------------------------------------------------------------------------------------


def test_text_format_access_line(servers: Servers, http: httpx.Client) -> None:
    request_id = _new_id()
    with capture_logs(servers, "text") as capture:
        resp = http.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "ignore_eos": True},
            headers={"x-request-id": request_id},
        )
        deadline = time.monotonic() + 15
        while not any(ACCESS_LOGGER in line for line in capture.lines()) and time.monotonic() < deadline:
            time.sleep(0.02)
    (line,) = [line for line in capture.lines() if ACCESS_LOGGER in line]
    assert f" INFO {ACCESS_LOGGER} [{request_id}]: POST /v1/completions 200 " in line
    assert 'transport="http"' in line and "status=200" in line and "completion_tokens=2" in line
    assert f"prompt_tokens={resp.json()['usage']['prompt_tokens']}" in line
    assert 'finish_reasons=["length"]' in line
