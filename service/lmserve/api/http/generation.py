"""/v1/completions and /v1/chat/completions: OpenAI's JSON in, the neutral call, its presented choices out
as a response or Server-Sent Events (the JSON shapes in serialize.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response

from lmserve.api.generation_call import GenerationCall, PresentedResult, prepare_chat, prepare_completion
from lmserve.api.http import schemas
from lmserve.api.http import serialize as ser
from lmserve.api.http.sse import sse_response, until_disconnect
from lmserve.api.http.wire import caller, chat_input, completion_input
from lmserve.api.presentation import PresentedChoice

if TYPE_CHECKING:
    from lmserve.state import AppState


async def _answer(
    request: Request,
    call: GenerationCall,
    body: schemas.CompletionRequest | schemas.ChatCompletionRequest,
    chunks: Callable[[PresentedChoice], list[dict[str, Any]]],
    header: ser.ChunkHeader,
    response: Callable[[PresentedResult], Any],
) -> Response:
    """Server-Sent Events when the body asks to stream (with a last usage chunk if asked), else the whole
    response once every choice has ended."""
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        usage_chunk = (lambda: header.chunk([], ser.usage_model(call.usage))) if include_usage else None
        return await sse_response(request, call, chunks, usage_chunk)
    result = await until_disconnect(request, call.collect())
    return ser.json_response(response(result), call.caller.response_headers)


async def completion(state: AppState, body: schemas.CompletionRequest, request: Request) -> Response:
    call = prepare_completion(state, caller(request), completion_input(body, request))
    want_logprobs = body.logprobs is not None
    header = ser.ChunkHeader(call.response_id, "text_completion", call.created, call.model.name)
    return await _answer(
        request, call, body, ser.CompletionChunks(header, call.num_choices, want_logprobs), header,
        lambda result: schemas.CompletionResponse(
            id=call.response_id, created=call.created, model=call.model.name,
            choices=[ser.completion_choice(c, want_logprobs) for c in result.choices], usage=ser.usage_model(result.usage),
        ),
    )  # fmt: skip


async def chat(state: AppState, body: schemas.ChatCompletionRequest, request: Request) -> Response:
    call = prepare_chat(state, caller(request), chat_input(body, request))
    num_top = body.top_logprobs or 0
    header = ser.ChunkHeader(call.response_id, "chat.completion.chunk", call.created, call.model.name)
    return await _answer(
        request, call, body, ser.ChatChunks(header, body.logprobs, num_top), header,
        lambda result: schemas.ChatCompletionResponse(
            id=call.response_id, created=call.created, model=call.model.name,
            choices=[ser.chat_choice(c, body.logprobs, num_top) for c in result.choices], usage=ser.usage_model(result.usage),
            prompt_logprobs=ser.prompt_logprobs_json(result.choices[0].prompt_logprobs) if result.choices else None,
        ),
    )  # fmt: skip
