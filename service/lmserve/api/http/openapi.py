"""The OpenAPI document (/openapi.json, /docs): the responses each route documents, 400 in our error shape
instead of FastAPI's 422, and this server's limits written into the schemas (`limit(...)` markers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from lmserve.api.http import schemas

if TYPE_CHECKING:
    from lmserve.state import AppState

_ERROR = {"model": schemas.ErrorResponse}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "Invalid request (bad JSON, a bad field, context length exceeded)."},
    401: {**_ERROR, "description": "Missing or invalid API key."},
    429: {**_ERROR, "description": "Rate limit exceeded; see Retry-After and x-ratelimit-* headers."},
    500: {**_ERROR, "description": "Internal error (a bug)."},
    503: {**_ERROR, "description": "Overloaded or not ready; see Retry-After."},
}
MODEL_ERRORS = {**ERROR_RESPONSES, 404: {**_ERROR, "description": "Unknown model."}}
STORED_ERRORS = {**ERROR_RESPONSES, 404: {**_ERROR, "description": "No such stored response (or another API key's)."}}
BODY_ERRORS = {**MODEL_ERRORS, 413: {**_ERROR, "description": "Request body too large."}}
GENERATION_ERRORS = {
    **BODY_ERRORS,
    504: {**_ERROR, "description": "The request's own timeout (x-request-timeout, timeout) passed before a token."},
}
# vLLM's LoRA endpoints answer success as a line of text (errors as everywhere else: JSON).
PLAIN_TEXT_200 = {200: {"description": "A line saying what was done.", "content": {"text/plain": {"schema": {"type": "string"}}}}}
# OpenAPI 3.1 reads an event stream's `schema` as the schema of one event.
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {
            "type": "string",
            "description": "A JSON chunk (the streamed object), an {\"error\": {...}} object, or [DONE] last.",
        },
        "event": {"type": "string"},
        "id": {"type": "string"},
    },
    "required": ["data"],
}
STREAM_200 = {
    200: {
        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
        "description": "The response object, or with `stream: true` Server-Sent Events.",
    }
}
PROBE_RESPONSES: dict[int | str, dict[str, Any]] = {503: {**_ERROR, "description": "Not alive / not ready."}}




def schema_limits(state: AppState) -> dict[str, int]:
    """Values for the `limit(...)` markers in schemas.py: this server's caps and vocabularies."""
    limits = state.config.limits
    values = {
        "max_n": limits.max_n,
        "max_tokens_cap": limits.max_tokens_cap,
        "max_stop_strings": limits.max_stop_strings,
        "max_prompts": limits.max_prompts,
        "max_embedding_inputs": limits.max_embedding_inputs,
        "max_rerank_documents": limits.max_rerank_documents,
        "vocab_max": state.tokenizer.vocab_size - 1,
    }
    if state.embedder is not None:
        values["embedding_vocab_max"] = state.embedder.vocab_size - 1
        values["embedding_max_tokens"] = state.embedder.max_input_tokens
        values["embedding_dimensions"] = state.embedder.dimensions
    return values


def _apply_limits(node: Any, values: dict[str, int]) -> None:
    if isinstance(node, dict):
        marker = node.pop("x-limit", None)
        if isinstance(marker, dict):
            for keyword, name in marker.items():
                if name in values:
                    node[keyword] = values[name]
        for child in node.values():
            _apply_limits(child, values)
    elif isinstance(node, list):
        for child in node:
            _apply_limits(child, values)


def build_openapi(app: FastAPI, limit_values: dict[str, int]) -> dict[str, Any]:
    """The OpenAPI document: 400 (our error shape) instead of FastAPI's 422, and this server's limits."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _apply_limits(schema, limit_values)
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", {"description": "Invalid request.", "content": error_ref})
    components = schema.get("components", {}).get("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    app.openapi_schema = schema
    return schema

