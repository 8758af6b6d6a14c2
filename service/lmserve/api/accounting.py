"""One request's bookkeeping, the same on both transports: its id, the in-flight counts, the request
metric, the access line and the trace.

    record = open_request(state, "grpc", incoming_request_id)    # before anything else
    ... admission and the handler fill `record` (key, tokens, finish reasons, error code) ...
    close_request(state, record, RequestOutcome(...))           # exactly once, however it ended

The id is the client's `x-request-id` (header or metadata) when valid, else a new one; it is set as
REQUEST_ID for every log line written while the request is served.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmserve.logs import REQUEST_ID, AccessRecord, log_access, resolve_request_id

if TYPE_CHECKING:
    from lmserve.state import AppState


@dataclass(frozen=True)
class RequestOutcome:
    """How a request ended, in each form its consumers want."""

    method: str  # HTTP method; "POST" for gRPC (an RPC is an HTTP/2 POST)
    path: str  # URL path, or the full gRPC method name "/lmserve.v1.Generation/Complete"
    endpoint: str  # the bounded `endpoint` metric label
    status: int  # HTTP status, or the HTTP status of the gRPC call's error kind (200 when OK)
    metric_status: str  # the `status` label: the HTTP status code, or the gRPC status code name
    traceparent: str | None = None


def open_request(state: AppState, transport: str, incoming_request_id: str | None) -> AccessRecord:
    record = AccessRecord(
        request_id=resolve_request_id(incoming_request_id),
        transport=transport,
        started=time.monotonic(),
        log_prompts=state.config.log_prompts,
    )
    # Never reset: the task serves only this request, and the layers outside it still log about it.
    REQUEST_ID.set(record.request_id)
    state.lifecycle.in_flight += 1
    state.metrics.requests_in_flight.labels(transport=transport).inc()
    return record


def close_request(state: AppState, record: AccessRecord, outcome: RequestOutcome) -> None:
    finished = time.monotonic()
    state.lifecycle.in_flight -= 1
    state.metrics.requests_in_flight.labels(transport=record.transport).dec()
    state.metrics.observe_request(outcome.endpoint, record.transport, outcome.metric_status)
    grpc_status = None if record.transport == "http" else outcome.metric_status
    log_access(record, outcome.method, outcome.path, outcome.status, finished, grpc_status)
    if state.tracer is not None:
        state.tracer.export(record, outcome.method, outcome.path, outcome.status, finished, outcome.traceparent)


def observe_error(state: AppState, record: AccessRecord, code: str) -> None:
    """Count an error the client gets and name it on the request's access line."""
    state.metrics.observe_error(code)
    record.error = code


__all__ = ["RequestOutcome", "close_request", "observe_error", "open_request"]
