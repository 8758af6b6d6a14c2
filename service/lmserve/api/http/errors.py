"""HTTP errors: every error in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the
status of the one error table (api/errors.py); FastAPI's validation errors (never its 422 shape) and
Starlette's own 404/405 translated into it; each counted and on the request's access line."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmserve.api.accounting import observe_error
from lmserve.api.errors import APIError
from lmserve.api.http.middleware import SENT_CONTENT_TYPE_SCOPE, access_record

if TYPE_CHECKING:
    from lmserve.state import AppState

log = logging.getLogger(__name__)


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.http_status, headers={**error.headers, **(headers or {})})


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"; union-member tags are dropped."""
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and ("[" in item or "-" in item or item in _PYDANTIC_TAGS):
            break  # e.g. 'list[int]', 'function-after[...]', 'str': pydantic's union member names
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or None


_PYDANTIC_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"})


def validation_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    if not errors:
        return APIError("Invalid request.", "invalid_request")
    param = _param_from_loc(tuple(errors[0].get("loc", ())))
    # A union field yields one error per member; the deepest one is what the client got wrong.
    same_param = [e for e in errors if _param_from_loc(tuple(e.get("loc", ()))) == param]
    first = max(same_param, key=lambda e: len(e.get("loc", ())))
    errors = [first] + [e for e in errors if _param_from_loc(tuple(e.get("loc", ()))) != param]
    kind = str(first.get("type", ""))
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(f"The request body is not valid JSON: {detail}".rstrip(": "), "invalid_json")
    if kind == "extra_forbidden":
        return APIError(
            f"Unrecognized request argument supplied: '{param}'. {first.get('msg', 'Extra inputs are not permitted')}; "
            "see /docs for the parameters each endpoint takes.",
            "unknown_field",
            param,
        )
    if kind == "missing":
        code = "missing_field"
        message = f"Missing required parameter: '{param}'." if param else "The request body is missing."
    else:
        code = "invalid_type" if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}." if param else str(first.get("msg"))
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return APIError(message, code, param)


def _http_exception_error(request: Request, exc: StarletteHTTPException) -> APIError:
    if exc.status_code == 404:
        return APIError(f"Not found: {request.method} {request.url.path}", "not_found")
    if exc.status_code == 405:
        return APIError(
            f"Method {request.method} is not allowed on {request.url.path}.",
            "method_not_allowed",
            headers=dict(exc.headers or {}),
        )
    code = {400: "invalid_request", 401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded"}.get(
        exc.status_code, "service_unavailable" if exc.status_code == 503 else "invalid_request"
    )
    return APIError(str(exc.detail), code, headers=dict(exc.headers or {}))


def install_error_handlers(app: FastAPI, state: AppState) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        observe_error(state, access_record(request.scope), exc.code)
        return error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        error = validation_error(exc)
        sent = request.scope.get(SENT_CONTENT_TYPE_SCOPE)
        if error.code == "invalid_json" and sent is not None:
            error = APIError(
                f"{error.message}. The body was sent with content-type: {sent}; lmserve reads every POST body "
                "as JSON (send it with content-type: application/json).",
                error.code,
                error.param,
            )
        observe_error(state, access_record(request.scope), error.code)
        return error_response(error)

    async def on_http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        error = _http_exception_error(request, exc)
        observe_error(state, access_record(request.scope), error.code)
        return error_response(error)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        record = access_record(request.scope)
        observe_error(state, record, "internal_error")
        # Starlette answers this one outside every middleware, so the request id header is set here.
        return error_response(APIError("Internal server error.", "internal_error"), {"x-request-id": record.request_id})

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(Exception, on_unexpected)


