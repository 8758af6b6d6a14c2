"""The one table of API errors: string code -> HTTP status, gRPC status name and OpenAI error type.

Both transports raise `APIError` and map it through `ERRORS`, so a given failure has the same code, message
and status class on HTTP and gRPC. Every error a client sees has the OpenAI shape
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ErrorKind:
    http_status: int
    grpc_status: str  # a grpc.StatusCode name, kept as a string so this module needs no grpc import
    type: str  # the OpenAI "type" field


_INVALID = ErrorKind(400, "INVALID_ARGUMENT", "invalid_request_error")

ERRORS: dict[str, ErrorKind] = {
    # 400: the request itself is wrong
    "invalid_request": _INVALID,
    "invalid_value": _INVALID,
    "invalid_type": _INVALID,
    "missing_field": _INVALID,
    "invalid_json": _INVALID,
    "unsupported_parameter": _INVALID,
    "unknown_field": _INVALID,
    "unsupported_value": _INVALID,
    "context_length_exceeded": _INVALID,
    "content_filter": _INVALID,
    # 401
    "invalid_api_key": ErrorKind(401, "UNAUTHENTICATED", "authentication_error"),
    # 404 / 405 / 413
    "model_not_found": ErrorKind(404, "NOT_FOUND", "invalid_request_error"),
    "not_found": ErrorKind(404, "NOT_FOUND", "invalid_request_error"),
    "method_not_allowed": ErrorKind(405, "UNIMPLEMENTED", "invalid_request_error"),
    "request_too_large": ErrorKind(413, "RESOURCE_EXHAUSTED", "invalid_request_error"),
    # 429 / 503: come back later
    "rate_limit_exceeded": ErrorKind(429, "RESOURCE_EXHAUSTED", "rate_limit_error"),
    "server_overloaded": ErrorKind(503, "UNAVAILABLE", "server_error"),
    "service_unavailable": ErrorKind(503, "UNAVAILABLE", "server_error"),
    "queue_timeout": ErrorKind(503, "UNAVAILABLE", "server_error"),  # waited past --queue-timeout unscheduled
    # 504: the request's own timeout (x-request-timeout / timeout) passed before its first token
    "request_timeout": ErrorKind(504, "DEADLINE_EXCEEDED", "timeout_error"),
    # 499-ish: the client went away; never sent, only counted
    "client_disconnected": ErrorKind(499, "CANCELLED", "invalid_request_error"),
    # 500: only for real bugs
    "internal_error": ErrorKind(500, "INTERNAL", "server_error"),
    # 500: the generation engine failed under this request (a failed forward); the server restarts
    "engine_failure": ErrorKind(500, "INTERNAL", "server_error"),
}


def error_kind(code: str) -> ErrorKind:
    """The kind for `code`; an unknown code is a bug and reads as a 400 rather than crashing the handler."""
    return ERRORS.get(code, _INVALID)


class APIError(Exception):
    """An error that reaches the client as-is. `code` must be a key of ERRORS."""

    def __init__(
        self,
        message: str,
        code: str = "invalid_request",
        param: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        kind = error_kind(code)
        self.type = type or kind.type
        self.http_status = kind.http_status
        self.grpc_status = kind.grpc_status

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"APIError({self.code!r}, {self.message!r}, param={self.param!r})"

