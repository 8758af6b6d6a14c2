"""OpenTelemetry spans of real requests: the main server traced into an in-memory exporter for one test."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from lmserve.tracing import build_tracer
from tests.api.conftest import LiveServer

MODEL = "smollm2-135m-instruct"


@pytest.fixture
def spans(server: LiveServer) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracer = build_tracer(None, exporter=exporter)
    server.state.tracer = tracer  # read per request by the accounting middleware
    try:
        yield exporter
    finally:
        server.state.tracer = None
        assert tracer is not None
        tracer.shutdown()


def _trace(
    exporter: InMemorySpanExporter, request_id: str, timeout_s: float = 15.0
) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The request's span and its children by start time, once exported (just after the response)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        finished = exporter.get_finished_spans()
        roots = [s for s in finished if s.attributes.get("lmserve.request_id") == request_id]
        if roots:
            (root,) = roots
            children = [s for s in finished if s.parent is not None and s.parent.span_id == root.context.span_id]
            return root, sorted(children, key=lambda s: (s.start_time, s.end_time))
        time.sleep(0.02)
    raise AssertionError(f"no span for {request_id}")


def _assert_in_order(root: ReadableSpan, phases: Sequence[ReadableSpan]) -> None:
    assert root.start_time == phases[0].start_time
    for before, after in zip(phases, phases[1:]):
        assert before.start_time <= before.end_time <= after.start_time, (before.name, after.name)
    assert phases[-1].end_time <= root.end_time
    assert all(p.context.trace_id == root.context.trace_id for p in phases)


def test_a_completion_is_one_server_span_starting_with_admission(
    http: httpx.Client, spans: InMemorySpanExporter
) -> None:
    request_id = f"trace-{uuid.uuid4().hex[:8]}"
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True}
    resp = http.post("/v1/completions", json=body, headers={"x-request-id": request_id})
    assert resp.status_code == 200
    root, phases = _trace(spans, request_id)
    assert root.name == "POST /v1/completions" and root.kind == SpanKind.SERVER and root.parent is None
    usage = resp.json()["usage"]
    assert root.attributes["lmserve.transport"] == "http"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert root.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 4
    assert phases[0].name == "admission" and phases[0].end_time < root.end_time
    _assert_in_order(root, phases)


def test_a_streamed_chat_continues_the_callers_trace(http: httpx.Client, spans: InMemorySpanExporter) -> None:
    request_id = f"trace-{uuid.uuid4().hex[:8]}"
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    headers = {"x-request-id": request_id, "traceparent": f"00-{trace_id}-{parent_id}-01"}
    with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        resp.read()
    root, phases = _trace(spans, request_id)
    assert root.name == "POST /v1/chat/completions"
    assert root.context.trace_id == int(trace_id, 16)
    assert root.parent is not None and root.parent.span_id == int(parent_id, 16)
    assert phases[0].name == "admission"


def test_each_choice_is_traced_through_queue_prefill_decode(http: httpx.Client, spans: InMemorySpanExporter) -> None:
    request_id = f"trace-{uuid.uuid4().hex[:8]}"
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "n": 2, "ignore_eos": True}
    assert http.post("/v1/completions", json=body, headers={"x-request-id": request_id}).status_code == 200
    root, phases = _trace(spans, request_id)
    assert phases[0].name == "admission"
    for choice in (0, 1):
        mine = [p for p in phases if p.attributes.get("lmserve.choice") == choice]
        assert [p.name for p in mine] == ["queue", "prefill", "decode"]
        _assert_in_order(root, [phases[0], *mine])


def test_a_refused_request_is_one_admission_span(server: LiveServer, spans: InMemorySpanExporter) -> None:
    request_id = f"trace-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=server.base_url, headers={"Authorization": "Bearer wrong"}) as client:
        assert client.get("/v1/models", headers={"x-request-id": request_id}).status_code == 401
    root, phases = _trace(spans, request_id)
    assert root.attributes["http.response.status_code"] == 401
    assert root.attributes["error.type"] == "invalid_api_key"
    assert [p.name for p in phases] == ["admission"]
    assert (phases[0].start_time, phases[0].end_time) == (root.start_time, root.end_time)
