"""Optional OpenTelemetry tracing: one span per request, with children for admission, queue, prefill, decode.

    tracer = build_tracer(config.otlp_endpoint)   # None when no endpoint is configured
    tracer.export(record, method, path, status, finished, traceparent)   # once, when the request ends

Spans are written after the request has ended, from the times its AccessRecord already holds (the
engine's RequestTiming among them), so tracing adds no work to the request path. Those times are
time.monotonic() seconds; one offset, taken once, turns them into the wall-clock nanoseconds spans use.
With tracing off nothing here imports opentelemetry (it is the optional `otel` extra).

The provider is ours, not the global one: a global provider would also switch on FastAPI's own telemetry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmserve.logs import AccessRecord

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

SERVICE_NAME = "lmserve"
OTLP_TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class Phase:
    """One stretch of a request's life, as a child span."""

    name: str  # admission | queue | prefill | decode
    start: float  # time.monotonic() seconds
    end: float
    choice: int | None = None  # which choice (engine sequence); None for the whole request


def request_phases(record: AccessRecord, finished: float) -> list[Phase]:
    """Admission (auth, limits, validation: until the work was submitted), then per choice its queue,
    prefill and decode. A phase a request never reached is left out; one it never left ends when it did."""
    admitted = record.submitted if record.submitted is not None else finished
    phases = [Phase("admission", record.started, admitted)]
    for i, timing in enumerate(record.timings):
        if timing is None:
            continue
        scheduled, first_token = timing.first_scheduled_time, timing.first_token_time
        phases.append(Phase("queue", timing.arrival_time, timing.finished_time if scheduled is None else scheduled, i))
        if scheduled is not None:
            prefill_end = timing.finished_time if first_token is None else first_token
            phases.append(Phase("prefill", scheduled, prefill_end, i))
        if first_token is not None:
            phases.append(Phase("decode", first_token, timing.finished_time, i))
    return phases


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for a collector base URL (as OTEL_EXPORTER_OTLP_ENDPOINT is read)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(OTLP_TRACES_PATH) else endpoint + OTLP_TRACES_PATH


class RequestTracer:
    """Turns finished requests into spans on its own TracerProvider."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self._tracer = provider.get_tracer(SERVICE_NAME)
        self._propagator = TraceContextTextMapPropagator()
        self._offset_ns = time.time_ns() - time.monotonic_ns()

    def _ns(self, monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + self._offset_ns

    def export(
        self, record: AccessRecord, method: str, path: str, status: int, finished: float, traceparent: str | None
    ) -> None:
        """The request's span (a child of the caller's `traceparent` span when given) and its phases."""
        from opentelemetry import trace

        parent = self._propagator.extract({"traceparent": traceparent}) if traceparent else None
        root = self._tracer.start_span(
            f"{method} {path}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            start_time=self._ns(record.started),
            attributes=_request_attributes(record, method, path, status),
        )
        if status >= 500:
            root.set_status(trace.Status(trace.StatusCode.ERROR))
        inside = trace.set_span_in_context(root)
        for phase in request_phases(record, finished):
            attributes = {} if phase.choice is None else {"lmserve.choice": phase.choice}
            start = self._ns(phase.start)
            self._tracer.start_span(phase.name, inside, start_time=start, attributes=attributes).end(self._ns(phase.end))
        root.end(self._ns(finished))

    def shutdown(self) -> None:
        """Flush the spans still batched and stop the exporter."""
        self._provider.shutdown()


def _request_attributes(record: AccessRecord, method: str, path: str, status: int) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "lmserve.request_id": record.request_id,
        "lmserve.transport": record.transport,
        "http.request.method": method,
        "url.path": path,
        "http.response.status_code": status,
    }
    if record.error is not None:
        attributes["error.type"] = record.error
    if record.lora is not None:
        attributes["lmserve.lora_adapter"] = record.lora
    if record.prompt_tokens is not None:
        attributes["gen_ai.usage.input_tokens"] = record.prompt_tokens
    if record.completion_tokens is not None:
        attributes["gen_ai.usage.output_tokens"] = record.completion_tokens
    return attributes


def build_tracer(endpoint: str | None, exporter: SpanExporter | None = None) -> RequestTracer | None:
    """A tracer exporting over OTLP/HTTP to `endpoint`, or to `exporter` when given (synchronously: tests
    pass an InMemorySpanExporter); None, importing nothing, when neither is given."""
    if endpoint is None and exporter is None:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise RuntimeError("tracing needs the otel extra: pip install 'lmserve[otel]'") from exc
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        assert endpoint is not None
        # Batched: spans leave on the processor's thread, never on the event loop.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
    return RequestTracer(provider)


__all__ = ["Phase", "RequestTracer", "build_tracer", "request_phases", "traces_url"]
