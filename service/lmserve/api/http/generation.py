"""/v1/completions and /v1/chat/completions: OpenAI's JSON in, the neutral call, its presented choices out
as a response or Server-Sent Events (the JSON shapes in serialize.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response

from lmserve.api.generation_call import GenerationCall, prepare_chat, prepare_completion
from lmserve.api.http import schemas
from lmserve.api.http import serialize as ser
from lmserve.api.http.sse import sse_response, until_disconnect
from lmserve.api.http.wire import caller, chat_input, completion_input

if TYPE_CHECKING:
    from lmserve.state import AppState


def _usage_chunk(call: GenerationCall, header: ser.ChunkHeader, body: Any) -> Any:
    if not (body.stream_options and body.stream_options.include_usage):
        return None
    return lambda: header.chunk([], ser.usage_model(call.usage))


async def completion(state: AppState, body: schemas.CompletionRequest, request: Request) -> Response:
    who = caller(request)
    call = prepare_completion(state, who, completion_input(body, request))
    want_logprobs = body.logprobs is not None
    if body.stream:
        header = ser.ChunkHeader(call.response_id, "text_completion", call.created, call.model.name)
        chunks = ser.CompletionChunks(header, call.num_choices, want_logprobs)
        return await sse_response(request, call, chunks, _usage_chunk(call, header, body))
    result = await until_disconnect(request, call.collect())
    response = schemas.CompletionResponse(
        id=call.response_id,
        created=call.created,
        model=call.model.name,
        choices=[ser.completion_choice(c, want_logprobs) for c in result.choices],
        usage=ser.usage_model(result.usage),
    )
    return ser.json_response(response, who.response_headers)


async def chat(state: AppState, body: schemas.ChatCompletionRequest, request: Request) -> Response:
    who = caller(request)
    call = prepare_chat(state, who, chat_input(body, request))
    num_top = body.top_logprobs or 0
    if body.stream:
        header = ser.ChunkHeader(call.response_id, "chat.completion.chunk", call.created, call.model.name)
        chunks = ser.ChatChunks(header, body.logprobs, num_top)
        return await sse_response(request, call, chunks, _usage_chunk(call, header, body))
    result = await until_disconnect(request, call.collect())
    response = schemas.ChatCompletionResponse(
        id=call.response_id,
        created=call.created,
        model=call.model.name,
        choices=[ser.chat_choice(c, body.logprobs, num_top) for c in result.choices],
        usage=ser.usage_model(result.usage),
    )
    return ser.json_response(response, who.response_headers)
