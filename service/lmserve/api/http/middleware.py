"""Pure-ASGI middleware for the HTTP transport: accounting (request ids, metrics, access line, trace),
API-key auth, the request body limit and JSON bodies whatever their content-type.

Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched and a client
disconnect still reaches the handler's `receive`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmserve.api.accounting import RequestOutcome, close_request, observe_error, open_request
from lmserve.api.admission import authenticate
from lmserve.api.errors import APIError
from lmserve.api.http.json_body import check_json_body
from lmserve.logs import AccessRecord

if TYPE_CHECKING:
    from lmserve.state import AppState

log = logging.getLogger(__name__)

KEY_ID_SCOPE = "lmserve.key_id"  # scope entry the auth middleware sets for handlers (rate limits)
RECORD_SCOPE = "lmserve.record"  # scope entry: the request's AccessRecord, which handlers fill in
SENT_CONTENT_TYPE_SCOPE = "lmserve.sent_content_type"  # the client's content-type, when it was not JSON
REQUEST_ID_HEADER = b"x-request-id"
TRANSPORT = "http"

_KNOWN_ENDPOINTS = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/rerank",
        "/rerank",
        "/v1/score",
        "/score",
        "/v1/moderations",
        "/v1/models",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/tokenize",
        "/detokenize",
        "/version",
        "/livez",
        "/readyz",
        "/health",
        "/metrics",
        "/docs",
        "/openapi.json",
    }
)


def endpoint_label(path: str) -> str:
    """A bounded label set: known paths as is, everything else "other"."""
    if path in _KNOWN_ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}"
    return "other"


def header_value(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def access_record(scope: Scope) -> AccessRecord:
    """The request's record (AccountingMiddleware, outermost, always sets it)."""
    return scope[RECORD_SCOPE]


async def send_error(send: Send, error: APIError) -> None:
    body = json.dumps(error.to_dict()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class AccountingMiddleware:
    """The outermost layer: accounting.py's open/close around every request.

    The request id is returned as `x-request-id` on every response (errors from the layers inside
    included), and the request's AccessRecord (scope[RECORD_SCOPE]) is what handlers fill in. When the
    app returns (for a stream: when it ended or the client left) the record becomes the one access
    line and, with tracing on, the trace.
    """

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = open_request(self.state, TRANSPORT, header_value(scope, REQUEST_ID_HEADER))
        scope[RECORD_SCOPE] = record
        id_header = (REQUEST_ID_HEADER, record.request_id.encode("ascii"))
        status = 499  # no response started: the client went away first
        errored = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            errored = True
            raise
        finally:
            if errored and status == 499:
                status = 500
            path = scope["path"]
            outcome = RequestOutcome(
                scope["method"], path, endpoint_label(path), status, str(status), header_value(scope, b"traceparent")
            )
            close_request(self.state, record, outcome)


class AuthMiddleware:
    """Requires `Authorization: Bearer <key>` on every path but the probes (and /metrics if open)."""

    def __init__(self, app: ASGIApp, state: AppState, open_paths: frozenset[str]) -> None:
        self.app = app
        self.state = state
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.state.keys.is_enabled and scope["path"] in self.open_paths:
            scope[KEY_ID_SCOPE] = "open"
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        try:
            scope[KEY_ID_SCOPE] = authenticate(
                self.state, header_value(scope, b"authorization"), client[0] if client else None
            )
        except APIError as exc:
            observe_error(self.state, access_record(scope), exc.code)
            await send_error(send, exc)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 `request_too_large` for bodies over the limit, counted while reading, not from Content-Length;
    400 `invalid_json` for a POST body that is not UTF-8, nests too deep or holds lone surrogates.

    The body is read here in full (it is bounded by the limit) and replayed to the app as one message;
    later `receive` calls go to the server, so the handler still hears `http.disconnect`.
    """

    def __init__(self, app: ASGIApp, state: AppState, max_body_bytes: int) -> None:
        self.app = app
        self.state = state
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> APIError:
        return APIError(
            f"Request body too large: the limit is {self.max_body_bytes} bytes.", "request_too_large"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_body_bytes:
                    await self._reject(scope, send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._reject(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        # Every POST body is JSON (JsonBodyMiddleware): what the parser would choke on or let through
        # to crash a handler is answered here, with a message that says what is wrong.
        malformed = check_json_body(body) if scope["method"] == "POST" else None
        if malformed is not None:
            await self._reject(scope, send, malformed)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _reject(self, scope: Scope, send: Send, error: APIError | None = None) -> None:
        error = error or self._too_large()
        observe_error(self.state, access_record(scope), error.code)
        await send_error(send, error)


def is_json_content_type(value: str) -> bool:
    media_type = value.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


class JsonBodyMiddleware:
    """Every POST body is read as JSON, whatever its content-type says.

    `curl -d` sends `application/x-www-form-urlencoded`, and some clients send no content-type or
    `text/plain`; FastAPI would then not parse the body and answer that it is not an object. The header is
    set to application/json before FastAPI reads the body, and the client's value is kept in
    scope[SENT_CONTENT_TYPE_SCOPE], so that a body that is not JSON gets an error naming the header.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            sent = header_value(scope, b"content-type")
            if sent is None or not is_json_content_type(sent):
                scope[SENT_CONTENT_TYPE_SCOPE] = sent or "(none)"
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope["headers"] = [*headers, (b"content-type", b"application/json")]
        await self.app(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Callable[[], Any]:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
