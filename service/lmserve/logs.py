"""Logging: JSON lines (or plain text), the current request's id on every line, one access line per request.

    configure_logging("json", "info")                     # once, at startup (app.run)
    record = AccessRecord(resolve_request_id(header), "http", time.monotonic(), log_prompts)
    token = REQUEST_ID.set(record.request_id)             # every line logged while serving carries it
    ... handlers fill `record` (tokens, finish reasons, timings) ...
    log_access(record, "POST", "/v1/completions", 200, time.monotonic())
    REQUEST_ID.reset(token)

Both transports use these, so an id is accepted, generated and logged the same way over HTTP (the
`x-request-id` header) and gRPC (the `x-request-id` metadata key, returned in trailing metadata).
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from lmserve.types import RequestTiming

LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")
ACCESS_LOGGER = "lmserve.access"
MAX_REQUEST_ID_LEN = 128

# The id of the request the running task serves. A ContextVar, not state on an object, because log
# calls deep in the stack (and in libraries) know nothing of the request; each request runs in its own
# task, whose context (and its child tasks') is a copy, so concurrent requests never see each other's id.
REQUEST_ID: ContextVar[str | None] = ContextVar("lmserve_request_id", default=None)

access_log = logging.getLogger(ACCESS_LOGGER)


def resolve_request_id(incoming: str | None) -> str:
    """The client's id when it is safe to echo in headers and logs (1-128 printable ASCII characters),
    else a fresh uuid4 hex. Both transports call this, so they accept exactly the same ids."""
    if incoming and len(incoming) <= MAX_REQUEST_ID_LEN and incoming.isascii() and incoming.isprintable():
        return incoming
    return uuid.uuid4().hex


@dataclass
class AccessRecord:
    """What one request did, filled in while it runs; written once as its access line (and trace).

    Times are time.monotonic() seconds, the clock RequestTiming uses, so they compare directly.
    """

    request_id: str
    transport: str  # http | grpc
    started: float  # the request arrived
    log_prompts: bool = False  # only then are `prompt` and `outputs` kept and logged
    submitted: float | None = None  # handed to the engine or embedder: the end of admission
    error: str | None = None  # the APIError code the client got
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # None: not a generation request
    cached_tokens: int | None = None
    finish_reasons: list[str] = field(default_factory=list)  # one per choice
    first_token: float | None = None  # the first token of any choice
    timings: list[RequestTiming | None] = field(default_factory=list)  # one per choice, from the engine
    prompt: Any = None  # as the client sent it (text, token ids or chat messages)
    outputs: list[str] | None = None  # one text per choice
    response_id: str | None = None  # a completion's `id` ("cmpl-" / "chatcmpl-" + request_id)
    lora: str | None = None  # the LoRA adapter a generation request ran with


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


PROBE_PATHS = frozenset({"/livez", "/readyz", "/health"})  # answered without a key, on HTTP
QUIET_PATHS = PROBE_PATHS | {"/metrics"}  # logged at DEBUG when they succeed


def log_access(
    record: AccessRecord, method: str, path: str, status: int, finished: float, grpc_status: str | None = None
) -> None:
    """The request's one access line: logger `lmserve.access`, INFO, the fields as extra attributes.

    For gRPC, `status` is the HTTP status of the call's error kind (200 when OK) and `grpc_status` the
    gRPC status code name, so one query over `status` covers both transports."""
    fields: dict[str, Any] = {
        "request_id": record.request_id,  # explicit: a transport may log after leaving the request's context
        "transport": record.transport,
        "method": method,
        "path": path,
        "status": status,
        "latency_ms": _ms(finished - record.started),
    }
    if grpc_status is not None:
        fields["grpc_status"] = grpc_status
    if record.response_id is not None:
        fields["response_id"] = record.response_id
    if record.lora is not None:
        fields["lora_adapter"] = record.lora
    if record.error is not None:
        fields["error"] = record.error
    if record.prompt_tokens is not None:
        fields["prompt_tokens"] = record.prompt_tokens
    if record.completion_tokens is not None:
        fields["completion_tokens"] = record.completion_tokens
        fields["cached_tokens"] = record.cached_tokens
        fields["finish_reasons"] = record.finish_reasons
        # From arrival, not from submission: what the client waited, admission included.
        fields["ttft_ms"] = None if record.first_token is None else _ms(record.first_token - record.started)
    if record.log_prompts:
        fields["prompt"] = record.prompt
        fields["outputs"] = record.outputs
    # Probes and scrapes (every few seconds, from machines) that succeed are DEBUG; they are still counted
    # in the request metrics.
    level = logging.DEBUG if path in QUIET_PATHS and status == 200 else logging.INFO
    access_log.log(level, "%s %s %d", method, path, status, extra=fields)


# -- formatting ------------------------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "taskName",
    "color_message",  # uvicorn's copy of msg with terminal colour codes
    "vllm_process_name",  # vLLM's record factory stamps every record once it is imported (--engine vllm)
}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request's id (None outside a request), unless it has one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id (when known), then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update(_extra_fields(record))
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request_id]: message key=value ...`, for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        line = f"{self.formatTime(record)} {record.levelname} {record.name}"
        line += f" [{request_id}]: " if request_id is not None else ": "
        line += record.getMessage()
        fields = _extra_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={json.dumps(v, ensure_ascii=False, default=str)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def make_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) in `log_format` that stamps request ids."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r} ({' | '.join(LOG_FORMATS)})")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    return handler


def configure_logging(log_format: str, level: str, stream: TextIO | None = None) -> logging.Handler:
    """Make the root logger's only handler ours, so every logger (ours, uvicorn's, libraries') that
    propagates to it writes the same format with request ids. Returns the handler."""
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r} ({' | '.join(LOG_LEVELS)})")
    handler = make_handler(log_format, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


__all__ = [
    "ACCESS_LOGGER",
    "REQUEST_ID",
    "AccessRecord",
    "JsonFormatter",
    "RequestIdFilter",
    "TextFormatter",
    "configure_logging",
    "log_access",
    "make_handler",
    "resolve_request_id",
]
