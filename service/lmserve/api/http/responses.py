"""/v1/responses on HTTP: OpenAI's Responses JSON in, the neutral call (api/responses.py), the Response
object or its typed Server-Sent Events out; GET and DELETE /v1/responses/{id} over the store.

Streamed events are `event: <type>` / `data: <json>` pairs, as OpenAI sends them, ending with
`response.completed` (or `response.incomplete`); an error after the first event is a last `error` event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from lmserve.api.accounting import observe_error
from lmserve.api.errors import APIError
from lmserve.api.http.schemas import LogitBias, _Request, at_least, bounds
from lmserve.api.http.sse import SSE_HEADERS, ClosingStreamingResponse, until_disconnect
from lmserve.api.http.wire import caller, request_timeout
from lmserve.api.plan import GenerationParams
from lmserve.api.response_output import ResponseEvent, ResponseObject
from lmserve.api.responses import ResponseCall, ResponsesInput, delete_response, get_response, item_dict, prepare_response

if TYPE_CHECKING:
    from lmserve.state import AppState

log = logging.getLogger(__name__)

# The sampling fields a Responses request may carry, passed on as sent (OpenAI's two, then vLLM's).
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed",
)  # fmt: skip


class ResponseText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: dict[str, Any] | None = Field(
        None, description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "name", "schema", "strict"}.'
    )
    verbosity: str | None = Field(None, description="Accepted and ignored.")


class ResponsesRequest(_Request):
    """OpenAI's Responses request (the fields this server serves; any other is refused by name)."""

    model: str | None = None
    input: str | list[dict[str, Any]] = Field(
        description="A string (one user turn) or items: message (text parts only), function_call, function_call_output."
    )
    instructions: str | None = Field(None, description="A system turn before the input; not carried to a later turn.")
    max_output_tokens: int | None = Field(None, json_schema_extra=at_least(1, maximum="max_tokens_cap"))
    temperature: float | None = Field(None, json_schema_extra=bounds("temperature"))
    top_p: float | None = Field(None, json_schema_extra=bounds("top_p"))
    top_k: int | None = Field(None, json_schema_extra=bounds("top_k"))
    min_p: float | None = Field(None, json_schema_extra=bounds("min_p"))
    repetition_penalty: float | None = Field(None, json_schema_extra=bounds("repetition_penalty"))
    presence_penalty: float | None = Field(None, json_schema_extra=bounds("presence_penalty"))
    frequency_penalty: float | None = Field(None, json_schema_extra=bounds("frequency_penalty"))
    seed: int | None = Field(None, json_schema_extra=bounds("seed"))
    logit_bias: LogitBias | None = None
    text: ResponseText | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="Function tools only: {type: function, name, description, parameters}.")
    tool_choice: Any = Field(None, description='"none", "auto" (the default), "required", or {"type": "function", "name": ...}.')
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool = Field(True, description="Keep the response (in memory, for its API key) for GET and previous_response_id.")
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    include: list[str] | None = Field(None, description="Only an empty list: no extra output data is served.")
    truncation: Literal["disabled", "auto"] | None = Field(
        None, description='Only "disabled" (the default): a conversation longer than the context is a 400.'
    )
    timeout: float | None = Field(
        None, json_schema_extra=bounds("timeout"), description="Seconds this request may take, as on chat (also x-request-timeout)."
    )


def responses_input(body: ResponsesRequest, request: Request) -> ResponsesInput:
    if body.include:
        raise APIError("include is not supported: no extra output data is served (send none).", "unsupported_value", "include")
    if body.truncation == "auto":
        raise APIError(
            "truncation 'auto' is not supported: a conversation longer than the context is a 400 "
            "(context_length_exceeded); send 'disabled' or leave it out.",
            "unsupported_value",
            "truncation",
        )
    timeout_s, timeout_param = request_timeout(body, request)
    params = GenerationParams(
        **{name: getattr(body, name) for name in SAMPLING_FIELDS},
        max_tokens=body.max_output_tokens,
        logit_bias=body.logit_bias,
        default_max_tokens=None,  # as chat: the room the context leaves
        prompt_param="input",
        max_tokens_param="max_output_tokens",
        timeout_s=timeout_s,
        timeout_param=timeout_param,
    )
    return ResponsesInput(
        body.model, body.input, params, body.instructions, body.tools, body.tool_choice, body.parallel_tool_calls,
        body.text.format if body.text is not None else None, body.store, body.previous_response_id, body.metadata,
    )  # fmt: skip


# -- OpenAI's JSON shapes ---------------------------------------------------------------------------------------


def response_json(r: ResponseObject) -> dict[str, Any]:
    usage = None
    if r.usage is not None:
        u = r.usage
        usage = {
            "input_tokens": u.input_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.output_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.total_tokens,
        }  # fmt: skip
    return {
        "id": r.id, "object": "response", "created_at": r.created_at, "model": r.model, "status": r.status,
        "output": [item_dict(i) for i in r.output], "error": None,
        "incomplete_details": {"reason": r.incomplete_reason} if r.status == "incomplete" else None,
        "previous_response_id": r.previous_response_id, **r.request, "usage": usage,
    }  # fmt: skip


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def event_json(e: ResponseEvent) -> dict[str, Any]:
    out: dict[str, Any] = {"type": e.type, "sequence_number": e.sequence_number}
    if e.type == "error":
        return {**out, "code": e.error_code, "message": e.text, "param": e.error_param}
    if e.response is not None:
        return {**out, "response": response_json(e.response)}
    out["output_index"] = e.output_index
    if e.item is not None:
        return {**out, "item": item_dict(e.item)}
    out["item_id"] = e.item_id
    if e.type in ("response.content_part.added", "response.content_part.done"):
        return {**out, "content_index": 0, "part": _text_part(e.text)}
    if e.type == "response.output_text.delta":
        return {**out, "content_index": 0, "delta": e.delta, "logprobs": []}
    if e.type == "response.output_text.done":
        return {**out, "content_index": 0, "text": e.text, "logprobs": []}
    if e.type == "response.reasoning_text.delta":
        return {**out, "content_index": 0, "delta": e.delta}
    if e.type == "response.reasoning_text.done":
        return {**out, "content_index": 0, "text": e.text}
    if e.type == "response.function_call_arguments.delta":
        return {**out, "delta": e.delta}
    return {**out, "arguments": e.text}  # response.function_call_arguments.done


def _sse(data: dict[str, Any]) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


def _json(data: dict[str, Any], headers: dict[str, str]) -> Response:
    return Response(json.dumps(data, ensure_ascii=False), media_type="application/json", headers=headers)


# -- the endpoints -------------------------------------------------------------------------------------------------


async def create(state: AppState, body: ResponsesRequest, request: Request) -> Response:
    call = prepare_response(state, caller(request), responses_input(body, request))
    if not body.stream:
        try:
            response = await until_disconnect(request, call.collect())
        finally:
            call.close()
        return _json(response_json(response), call.caller.response_headers)
    events = call.events()
    try:
        first = await until_disconnect(request, anext(events))
    except BaseException:
        await events.aclose()
        call.close()
        raise
    return ClosingStreamingResponse(
        _stream(call, events, first), on_close=call.close, media_type="text/event-stream",
        headers={**SSE_HEADERS, **call.caller.response_headers},
    )  # fmt: skip


async def _stream(call: ResponseCall, events: AsyncIterator[ResponseEvent], first: ResponseEvent) -> AsyncIterator[str]:
    number = first.sequence_number
    try:
        yield _sse(event_json(first))
        async for event in events:
            number = event.sequence_number
            yield _sse(event_json(event))
    except APIError as exc:
        observe_error(call.state, call.caller.record, exc.code)
        yield _sse(event_json(ResponseEvent("error", number + 1, text=exc.message, error_code=exc.code, error_param=exc.param)))
    except Exception:
        log.exception("%s stream failed", call.response_id)
        observe_error(call.state, call.caller.record, "internal_error")
        yield _sse(event_json(ResponseEvent("error", number + 1, text="Internal error while streaming.", error_code="internal_error")))
    finally:
        await events.aclose()  # type: ignore[attr-defined]


def retrieve(state: AppState, response_id: str, request: Request) -> Response:
    who = caller(request)
    return _json(response_json(get_response(state, who, response_id)), who.response_headers)


def delete(state: AppState, response_id: str, request: Request) -> Response:
    who = caller(request)
    delete_response(state, who, response_id)
    return _json({"id": response_id, "object": "response.deleted", "deleted": True}, who.response_headers)


__all__ = ["ResponsesRequest", "create", "delete", "event_json", "response_json", "responses_input", "retrieve"]
