"""The HTTP transport: an OpenAI-compatible FastAPI app over an AppState (`create_app(state)`).

Routes: /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models[/{id}], /tokenize,
/detokenize, /version, /livez, /readyz, /health, /metrics, /docs, /openapi.json.

Every error is `{"error": {"message", "type", "param", "code"}}` (never FastAPI's 422 shape). Generation
goes through api/generation.py, shared with gRPC; this module only parses, formats and streams.

Structured outputs (`response_format`, vLLM's `structured_outputs`) and tool calls (`tools`, `tool_choice`)
are parsed in api/structured.py and api/tools.py, shared with gRPC. Not supported (documented in the
OpenAPI schema): `suffix`, `best_of` != n, image/audio content parts. With `echo` + `logprobs`, prompt
tokens carry null logprobs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from lmserve.api import openai_format as fmt
from lmserve.api import schemas
from lmserve.api.errors import APIError
from lmserve.api.accounting import observe_error
from lmserve.api.admission import Caller
from lmserve.api.generation import ChoiceDelta, ChoiceResult, GenerationParams
from lmserve.api.structured import ResponseFormatInput, StructuredOutputsInput, resolve_structured
from lmserve.api.tools import ToolPlan, ToolStreamParser
from lmserve.api.handlers import (
    ChatInput,
    CompletionInput,
    EmbedInput,
    GenerationCall,
    TokenizeInput,
    chat_logprobs,
    detokenize,
    load_lora_adapter,
    moderate,
    prepare_chat,
    prepare_completion,
    prepare_embedding,
    served_models,
    tokenize,
    unload_lora_adapter,
)
from lmserve.api.middleware import (
    KEY_ID_SCOPE,
    SENT_CONTENT_TYPE_SCOPE,
    AccountingMiddleware,
    AuthMiddleware,
    BodyLimitMiddleware,
    JsonBodyMiddleware,
    access_record,
)
from lmserve.logs import PROBE_PATHS
from lmserve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from lmserve.state import readiness

if TYPE_CHECKING:
    from lmserve.state import AppState

log = logging.getLogger(__name__)

T = TypeVar("T")

_IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image", "image_file"})

_ERROR = {"model": schemas.ErrorResponse}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "Invalid request (bad JSON, a bad field, context length exceeded)."},
    401: {**_ERROR, "description": "Missing or invalid API key."},
    429: {**_ERROR, "description": "Rate limit exceeded; see Retry-After and x-ratelimit-* headers."},
    500: {**_ERROR, "description": "Internal error (a bug)."},
    503: {**_ERROR, "description": "Overloaded or not ready; see Retry-After."},
}
_MODEL_ERRORS = {**ERROR_RESPONSES, 404: {**_ERROR, "description": "Unknown model."}}
_BODY_ERRORS = {**_MODEL_ERRORS, 413: {**_ERROR, "description": "Request body too large."}}
_GENERATION_ERRORS = {
    **_BODY_ERRORS,
    504: {**_ERROR, "description": "The request's own timeout (x-request-timeout, timeout) passed before a token."},
}
# vLLM's LoRA endpoints answer success as a line of text (errors as everywhere else: JSON).
_PLAIN_TEXT_200 = {200: {"description": "A line saying what was done.", "content": {"text/plain": {"schema": {"type": "string"}}}}}
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
_STREAM_200 = {
    200: {
        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
        "description": "The response object, or with `stream: true` Server-Sent Events.",
    }
}
_PROBE_RESPONSES: dict[int | str, dict[str, Any]] = {503: {**_ERROR, "description": "Not alive / not ready."}}


def _version() -> str:
    try:
        return metadata.version("lmserve")
    except metadata.PackageNotFoundError:
        return "0.1.0"


# -- errors ----------------------------------------------------------------------------------------------


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


def _install_error_handlers(app: FastAPI, state: AppState) -> None:
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


# -- helpers ---------------------------------------------------------------------------------------------


def caller(request: Request) -> Caller:
    """The request's Caller (AuthMiddleware sets the key id; AccountingMiddleware the record)."""
    return Caller(access_record(request.scope), str(request.scope.get(KEY_ID_SCOPE, "anonymous")))


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it if the client disconnects first (which aborts its engine work).

    The request body has been read by now, so the next `receive` only returns on disconnect.
    """
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise APIError("The client closed the connection.", "client_disconnected")
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its iterator, even when the client left mid-send.

    Closing it closes the engine streams under it, which aborts the requests and frees their KV blocks
    at once, instead of whenever the abandoned generator is garbage-collected. `on_close` runs last, also
    when the iterator never started (a client gone before the first chunk), whose `finally` never runs.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                self.on_close()


def _json(model: Any, headers: dict[str, str]) -> Response:
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)


def _stop_tuple(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _generation_params(
    body: schemas.CompletionRequest | schemas.ChatCompletionRequest,
    *,
    max_tokens: int | None,
    default_max_tokens: int | None,
    logprobs: int | None,
    max_logprobs: int,
    prompt_param: str,
    max_tokens_param: str = "max_tokens",
    request: Request | None = None,
) -> GenerationParams:
    timeout_s, timeout_param = _request_timeout(body, request)
    return GenerationParams(
        max_tokens=max_tokens,
        n=body.n,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=body.logit_bias,
        seed=body.seed,
        stop=_stop_tuple(body.stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
        speculative_tokens=body.speculative_tokens,
        structured=resolve_structured(_response_format(body.response_format), _structured_outputs(body.structured_outputs)),
        default_max_tokens=default_max_tokens,
        max_logprobs=max_logprobs,
        prompt_param=prompt_param,
        max_tokens_param=max_tokens_param,
        timeout_s=timeout_s,
        timeout_param=timeout_param,
    )


TIMEOUT_HEADER = "x-request-timeout"


def _request_timeout(
    body: schemas.CompletionRequest | schemas.ChatCompletionRequest, request: Request | None
) -> tuple[float | None, str]:
    """The request's deadline in seconds (the smaller of the `timeout` field and the x-request-timeout
    header) and the parameter it came from, for errors."""
    timeout, param = body.timeout, "timeout"
    raw = request.headers.get(TIMEOUT_HEADER) if request is not None else None
    if raw is not None:
        try:
            header = float(raw)
        except ValueError:
            header = math.nan
        if not (math.isfinite(header) and header > 0):
            raise APIError(
                f"The {TIMEOUT_HEADER} header must be a positive number of seconds, got {raw!r}.",
                "invalid_value",
                TIMEOUT_HEADER,
            ) from None
        if timeout is None or header < timeout:
            timeout, param = header, TIMEOUT_HEADER
    return timeout, param


def _response_format(fmt: schemas.ResponseFormat | None) -> ResponseFormatInput | None:
    if fmt is None:
        return None
    spec = fmt.json_schema
    return ResponseFormatInput(fmt.type, spec.schema_ if spec is not None else None, spec is not None)


def _structured_outputs(so: schemas.StructuredOutputs | None) -> StructuredOutputsInput | None:
    if so is None:
        return None
    return StructuredOutputsInput(so.json_, so.regex, so.choice, so.grammar, so.json_object)


def chat_messages(messages: list[schemas.ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI's chat messages -> the template's dicts; text content parts are joined, others refused."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        item = message.model_dump(exclude_none=True)
        item.setdefault("content", "")  # e.g. an assistant turn with only tool_calls; templates expect a string
        if isinstance(message.content, list):
            texts: list[str] = []
            for j, part in enumerate(message.content):
                where = f"messages[{i}].content[{j}]"
                if part.type == "text":
                    if part.text is None:
                        raise APIError("A text content part needs 'text'.", "missing_field", f"{where}.text")
                    texts.append(part.text)
                elif part.type in _IMAGE_PART_TYPES:
                    raise APIError(
                        "Image inputs are not supported: the served model is text-only.",
                        "unsupported_value",
                        f"{where}.type",
                    )
                else:
                    raise APIError(
                        f"Content part type '{part.type}' is not supported; only 'text' parts are.",
                        "unsupported_value",
                        f"{where}.type",
                    )
            item["content"] = "\n".join(texts)
        out.append(item)
    return out


# -- generation handlers -----------------------------------------------------------------------------------


class GenerationHandlers:
    """/v1/completions and /v1/chat/completions: OpenAI's JSON <-> the neutral handlers."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    # completions ----------------------------------------------------------------------------------------

    async def completion(self, body: schemas.CompletionRequest, request: Request) -> Response:
        who = caller(request)
        if body.suffix is not None:
            raise APIError("suffix is not supported.", "unsupported_parameter", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(
                "best_of must equal n: this server does not rank candidate completions.", "unsupported_value", "best_of"
            )
        params = _generation_params(
            body,
            # Absent max_tokens means OpenAI's default of 16 (capped by the server), not an explicit 16.
            max_tokens=body.max_tokens if "max_tokens" in body.model_fields_set else None,
            default_max_tokens=16,
            logprobs=body.logprobs,
            max_logprobs=5,
            prompt_param="prompt",
            request=request,
        )
        call = prepare_completion(self.state, who, CompletionInput(body.model, body.prompt, params, body.echo))
        if body.stream:
            header = fmt.ChunkHeader(call.response_id, "text_completion", call.created, call.model.name)
            chunker = self._completion_chunker(call, body)
            return await self._sse_response(request, call, header, _include_usage(body), chunker)
        result = await until_disconnect(request, call.collect())
        choices = [self._completion_choice(c, call, body) for c in result.choices]
        response = schemas.CompletionResponse(
            id=call.response_id,
            created=call.created,
            model=call.model.name,
            choices=choices,
            usage=fmt.usage_model(result.usage),
        )
        return _json(response, who.response_headers)

    def _completion_choice(
        self, choice: ChoiceResult, call: GenerationCall, body: schemas.CompletionRequest
    ) -> schemas.CompletionChoice:
        prompt_index = call.prompt_index(choice.index)
        text = choice.text
        logprobs = None
        if body.logprobs is not None:
            builder = fmt.CompletionLogprobsBuilder()
            parts = []
            if call.echo_texts is not None:
                prompt_tokens = self.state.tokenizer.convert_ids_to_tokens(call.plan.prompts[prompt_index])
                parts.append(builder.prompt(prompt_tokens))
            parts.append(builder.tokens(choice.logprobs or []))
            logprobs = fmt.merge_completion_logprobs(parts)
        if call.echo_texts is not None:
            text = call.echo_texts[prompt_index] + text
        return schemas.CompletionChoice(
            index=choice.index,
            text=text,
            logprobs=logprobs,
            finish_reason=fmt.finish_reason_str(choice.finish_reason),
            stop_reason=choice.stop_reason,
        )

    def _completion_chunker(
        self, call: GenerationCall, body: schemas.CompletionRequest
    ) -> Callable[[ChoiceDelta], dict[str, Any] | None]:
        """A delta -> its streamed choice (None: nothing to send); a choice's first chunk carries the echo."""
        tokenizer = self.state.tokenizer
        builders = [fmt.CompletionLogprobsBuilder() for _ in range(call.num_choices)]
        started = [False] * call.num_choices
        want_logprobs = body.logprobs is not None
        echo_texts = call.echo_texts

        def choice_chunk(item: ChoiceDelta) -> dict[str, Any] | None:
            i, delta = item.index, item.delta
            text = delta.text
            parts = []
            if not started[i]:
                started[i] = True
                if echo_texts is not None:
                    prompt_index = call.prompt_index(i)
                    text = echo_texts[prompt_index] + text
                    if want_logprobs:
                        tokens = tokenizer.convert_ids_to_tokens(call.plan.prompts[prompt_index])
                        parts.append(builders[i].prompt(tokens))
            if want_logprobs and delta.logprobs:
                parts.append(builders[i].tokens(delta.logprobs))
            if not text and delta.finish_reason is None and not parts:
                return None
            return {
                "index": i,
                "text": text,
                "logprobs": fmt.merge_completion_logprobs(parts).model_dump() if want_logprobs else None,
                "finish_reason": fmt.finish_reason_str(delta.finish_reason),
                "stop_reason": delta.stop_reason,
            }

        return choice_chunk

    # chat ------------------------------------------------------------------------------------------------

    async def chat(self, body: schemas.ChatCompletionRequest, request: Request) -> Response:
        who = caller(request)
        use_mct = body.max_completion_tokens is not None
        params = _generation_params(
            body,
            max_tokens=body.max_completion_tokens if use_mct else body.max_tokens,
            default_max_tokens=None,
            logprobs=chat_logprobs(body.logprobs, body.top_logprobs),
            max_logprobs=20,
            prompt_param="messages",
            max_tokens_param="max_completion_tokens" if use_mct else "max_tokens",
            request=request,
        )
        inp = ChatInput(
            body.model,
            chat_messages(body.messages),
            params,
            body.add_generation_prompt,
            body.tools,
            body.chat_template_kwargs,
            body.tool_choice,
            body.parallel_tool_calls,
        )
        call = prepare_chat(self.state, who, inp)
        num_top = body.top_logprobs or 0
        if body.stream:
            header = fmt.ChunkHeader(call.response_id, "chat.completion.chunk", call.created, call.model.name)
            roles = [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(call.num_choices)
            ]
            chunker = _chat_chunker(body.logprobs, num_top, call.tool_plan, call.num_choices)
            return await self._sse_response(request, call, header, _include_usage(body), chunker, roles)
        result = await until_disconnect(request, call.collect())
        response = schemas.ChatCompletionResponse(
            id=call.response_id,
            created=call.created,
            model=call.model.name,
            choices=[fmt.chat_choice(c, body.logprobs, num_top, call.tool_plan) for c in result.choices],
            usage=fmt.usage_model(result.usage),
        )
        return _json(response, who.response_headers)

    # streaming, both endpoints --------------------------------------------------------------------------

    async def _sse_response(
        self,
        request: Request,
        call: GenerationCall,
        header: fmt.ChunkHeader,
        include_usage: bool,
        choice_chunk: Callable[[ChoiceDelta], dict[str, Any] | None],
        first_choices: Sequence[dict[str, Any]] = (),
    ) -> Response:
        """The stream opens once its first delta is there: whatever ends a request before its first token
        (its timeout: 504, the queue timeout: 503, a failed engine) is then a plain HTTP error with its
        status and Retry-After, not a 200 whose only event is an error."""
        stream = call.stream()
        try:
            first = await until_disconnect(request, anext(stream))
        except StopAsyncIteration:
            first = None
        except BaseException:
            await stream.aclose()
            call.close()
            raise
        events = self._sse_events(call, stream, first, header, include_usage, choice_chunk, first_choices)
        return ClosingStreamingResponse(
            events,
            on_close=call.close,
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **call.caller.response_headers},
        )

    async def _sse_events(
        self,
        call: GenerationCall,
        stream: AsyncIterator[ChoiceDelta],
        first: ChoiceDelta | None,
        header: fmt.ChunkHeader,
        include_usage: bool,
        choice_chunk: Callable[[ChoiceDelta], dict[str, Any] | None],
        first_choices: Sequence[dict[str, Any]],
    ) -> AsyncIterator[str]:
        """`first_choices`, one chunk per delta that `choice_chunk` makes one of (`first`, then the rest of
        `stream`), the usage chunk if asked for, then [DONE]. An error becomes a last `{"error": ...}` event
        before [DONE]."""
        record = call.caller.record
        try:
            for choice in first_choices:
                yield sse(header.chunk([choice]))
            async with aclosing(stream):  # type: ignore[type-var]
                if first is not None:
                    choice = choice_chunk(first)
                    if choice is not None:
                        yield sse(header.chunk([choice]))
                async for item in stream:
                    choice = choice_chunk(item)
                    if choice is not None:
                        yield sse(header.chunk([choice]))
            if include_usage:
                yield sse(header.chunk([], fmt.usage_model(call.usage)))
            yield SSE_DONE
        except APIError as exc:
            observe_error(self.state, record, exc.code)
            yield sse(exc.to_dict())
            yield SSE_DONE
        except Exception:
            log.exception("%s stream failed", header.object)
            observe_error(self.state, record, "internal_error")
            yield sse(APIError("Internal error while streaming.", "internal_error").to_dict())
            yield SSE_DONE


def _include_usage(body: schemas.CompletionRequest | schemas.ChatCompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _chat_chunker(
    want_logprobs: bool, num_top: int, tool_plan: ToolPlan | None = None, num_choices: int = 1
) -> Callable[[ChoiceDelta], dict[str, Any] | None]:
    """A delta -> its streamed chat choice (None: nothing to send). With tools, each choice's text goes
    through its own ToolStreamParser: content as `content`, calls as OpenAI's `tool_calls` deltas."""
    parsers = [ToolStreamParser(tool_plan) for _ in range(num_choices)] if tool_plan and tool_plan.parses_calls else None

    def choice_chunk(item: ChoiceDelta) -> dict[str, Any] | None:
        i, delta = item.index, item.delta
        logprobs = None
        if want_logprobs and delta.logprobs:
            logprobs = fmt.chat_logprobs(delta.logprobs, num_top).model_dump()
        message: dict[str, Any] = {"content": delta.text} if delta.text else {}
        finish_reason = fmt.finish_reason_str(delta.finish_reason)
        if parsers is not None:
            events = parsers[i].feed(delta.text)
            if delta.finish_reason is not None:
                events += parsers[i].finish()
                assert tool_plan is not None
                finish_reason = tool_plan.finish_reason(bool(parsers[i].calls), delta.finish_reason)
            message = fmt.chat_delta(events)
        if delta.finish_reason is None:
            if not message and logprobs is None:
                return None
            return {"index": i, "delta": message or {"content": ""}, "logprobs": logprobs, "finish_reason": None}
        return {
            "index": i,
            "delta": message,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "stop_reason": delta.stop_reason,
        }

    return choice_chunk


# -- embeddings -------------------------------------------------------------------------------------------


def _embedding_inputs(raw: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    if isinstance(raw, str):
        return [raw]
    if raw and isinstance(raw[0], int):
        return [raw]  # type: ignore[list-item]
    return raw  # type: ignore[return-value]


def _encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


async def handle_embeddings(state: AppState, body: schemas.EmbeddingRequest, request: Request) -> Response:
    who = caller(request)
    inp = EmbedInput(body.model, _embedding_inputs(body.input), body.dimensions, logged_input=body.input)
    call = await prepare_embedding(state, who, inp)
    result = await until_disconnect(request, call.run())
    response = schemas.EmbeddingResponse(
        data=[
            schemas.EmbeddingData(index=i, embedding=_encode_vector(v, body.encoding_format))
            for i, v in enumerate(result.vectors)
        ],
        model=result.model.name,
        usage=schemas.UsageInfo(prompt_tokens=result.total_tokens, total_tokens=result.total_tokens),
    )
    return _json(response, who.response_headers)


# -- tokenize / detokenize --------------------------------------------------------------------------------


def handle_tokenize(state: AppState, body: schemas.TokenizeRequest) -> Response:
    inp = TokenizeInput(
        model=body.model,
        prompt=body.prompt,
        messages=None if body.messages is None else chat_messages(body.messages),
        add_special_tokens=body.add_special_tokens,
        add_generation_prompt=body.add_generation_prompt,
        return_token_strs=body.return_token_strs,
        tools=body.tools,
        template_kwargs=body.chat_template_kwargs,
    )
    out = tokenize(state, inp)
    response = schemas.TokenizeResponse(
        count=len(out.tokens), max_model_len=out.max_model_len, tokens=out.tokens, token_strs=out.token_strs
    )
    return _json(response, {})


def handle_detokenize(state: AppState, body: schemas.DetokenizeRequest) -> Response:
    return _json(schemas.DetokenizeResponse(prompt=detokenize(state, body.model, body.tokens)), {})


# -- models, health, metrics ------------------------------------------------------------------------------


def model_cards(state: AppState) -> list[schemas.ModelCard]:
    return [
        schemas.ModelCard(
            id=m.served.name, created=m.served.created, max_model_len=m.max_model_len,
            root=m.served.root or m.served.name, parent=m.served.parent, family=m.family,
        )  # fmt: skip
        for m in served_models(state)
    ]


def _unavailable(reason: str) -> Response:
    return error_response(APIError(f"Not ready: {reason}.", "service_unavailable"))


# -- the app ----------------------------------------------------------------------------------------------


def schema_limits(state: AppState) -> dict[str, int]:
    """Values for the `limit(...)` markers in schemas.py: this server's caps and vocabularies."""
    limits = state.config.limits
    values = {
        "max_n": limits.max_n,
        "max_tokens_cap": limits.max_tokens_cap,
        "max_stop_strings": limits.max_stop_strings,
        "max_prompts": limits.max_prompts,
        "max_embedding_inputs": limits.max_embedding_inputs,
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


def create_app(state: AppState) -> FastAPI:
    """The HTTP app over `state` (models already loaded; started by the caller)."""
    app = FastAPI(
        title="lmserve",
        version=_version(),
        description=__doc__,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    _install_error_handlers(app, state)
    gen = GenerationHandlers(state)

    @app.post(
        "/v1/completions",
        response_model=schemas.CompletionResponse,
        responses={**_GENERATION_ERRORS, **_STREAM_200},
        tags=["openai"],
    )
    async def create_completion(body: schemas.CompletionRequest, request: Request) -> Response:
        """OpenAI completions; `stream: true` answers Server-Sent Events ending in `data: [DONE]`."""
        return await gen.completion(body, request)

    @app.post(
        "/v1/chat/completions",
        response_model=schemas.ChatCompletionResponse,
        responses={**_GENERATION_ERRORS, **_STREAM_200},
        tags=["openai"],
    )
    async def create_chat_completion(body: schemas.ChatCompletionRequest, request: Request) -> Response:
        """OpenAI chat completions (text content only; tools reach the template, calls are not parsed)."""
        return await gen.chat(body, request)

    @app.post("/v1/embeddings", response_model=schemas.EmbeddingResponse, responses=_BODY_ERRORS, tags=["openai"])
    async def create_embeddings(body: schemas.EmbeddingRequest, request: Request) -> Response:
        """OpenAI embeddings; `encoding_format: base64` gives little-endian float32 bytes."""
        return await handle_embeddings(state, body, request)

    @app.get("/v1/models", response_model=schemas.ModelList, responses=ERROR_RESPONSES, tags=["openai"])
    async def list_models() -> Response:
        return _json(schemas.ModelList(data=model_cards(state)), {})

    @app.get("/v1/models/{model_id:path}", response_model=schemas.ModelCard, responses=_MODEL_ERRORS, tags=["openai"])
    async def retrieve_model(model_id: str) -> Response:
        for card, info in zip(model_cards(state), served_models(state), strict=True):
            if model_id in info.served.aliases:
                return _json(card, {})
        raise APIError(f"The model '{model_id}' does not exist.", "model_not_found", "model")

    @app.post("/v1/load_lora_adapter", responses={**_BODY_ERRORS, **_PLAIN_TEXT_200}, tags=["lora"])
    async def load_lora(body: schemas.LoadLoraAdapterRequest, request: Request) -> Response:
        """vLLM's: serve the PEFT adapter folder `lora_path` as the model `lora_name` (with --allow-runtime-lora)."""
        who = caller(request)
        text = await load_lora_adapter(state, who, body.lora_name, body.lora_path, body.load_inplace)
        return PlainTextResponse(text, headers=who.response_headers)

    @app.post("/v1/unload_lora_adapter", responses={**_BODY_ERRORS, **_PLAIN_TEXT_200}, tags=["lora"])
    async def unload_lora(body: schemas.UnloadLoraAdapterRequest, request: Request) -> Response:
        """vLLM's: stop serving `lora_name`; requests already running with it finish."""
        who = caller(request)
        text = await unload_lora_adapter(state, who, body.lora_name)
        return PlainTextResponse(text, headers=who.response_headers)

    @app.post("/v1/moderations", response_model=schemas.ModerationResponse, responses=_BODY_ERRORS, tags=["openai"])
    async def create_moderation(body: schemas.ModerationRequest, request: Request) -> Response:
        """OpenAI moderations, backed by the safety filter's scanners: every category found is flagged."""
        who = caller(request)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        out = moderate(state, who, body.model, texts)
        response = schemas.ModerationResponse(
            id=out.id, model=out.model, results=[schemas.ModerationResult(**r.to_dict()) for r in out.results]
        )
        return _json(response, who.response_headers)

    @app.post("/tokenize", response_model=schemas.TokenizeResponse, responses=_BODY_ERRORS, tags=["tokens"])
    async def tokenize(body: schemas.TokenizeRequest) -> Response:
        """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""
        return handle_tokenize(state, body)

    @app.post("/detokenize", response_model=schemas.DetokenizeResponse, responses=_BODY_ERRORS, tags=["tokens"])
    async def detokenize(body: schemas.DetokenizeRequest) -> Response:
        return handle_detokenize(state, body)

    @app.get("/version", response_model=schemas.VersionResponse, responses=ERROR_RESPONSES, tags=["service"])
    async def version() -> Response:
        return _json(schemas.VersionResponse(version=app.version, engine=state.config.engine_kind), {})

    @app.get("/livez", response_model=schemas.HealthResponse, responses=_PROBE_RESPONSES, tags=["service"])
    async def livez() -> Response:
        """200 while the process and the engine loop are alive."""
        if not state.engine.stats().is_alive:
            return _unavailable("the generation engine loop is not running")
        return _json(schemas.HealthResponse(status="ok"), {})

    async def ready() -> Response:
        reason = readiness(state)
        if reason is not None:
            return _unavailable(reason)
        return _json(schemas.HealthResponse(status="ready"), {})

    app.add_api_route(
        "/readyz", ready, methods=["GET"], response_model=schemas.HealthResponse, responses=_PROBE_RESPONSES,
        tags=["service"], summary="200 when models are loaded, the engine is healthy and not draining",
    )
    app.add_api_route(
        "/health", ready, methods=["GET"], response_model=schemas.HealthResponse, responses=_PROBE_RESPONSES,
        tags=["service"], summary="Same as /readyz", operation_id="health",
    )

    @app.get(
        "/metrics",
        responses={**ERROR_RESPONSES, 200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "OK"}},
        response_class=Response,
        tags=["service"],
    )
    async def metrics() -> Response:
        """Prometheus text exposition."""
        state.metrics.observe_engine(state.engine.stats())
        return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    limit_values = schema_limits(state)
    app.openapi = lambda: build_openapi(app, limit_values)  # type: ignore[method-assign]

    # Middleware: the last added runs first. Accounting (outermost, so every response, CORS preflights
    # included, carries the request id and gets an access line) -> CORS -> auth -> body limit -> JSON
    # body -> app.
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, state=state, max_body_bytes=state.config.limits.max_request_body_bytes)
    open_paths = PROBE_PATHS | ({"/metrics"} if state.config.metrics_open else set())
    app.add_middleware(AuthMiddleware, state=state, open_paths=frozenset(open_paths))
    if state.config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.config.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=[
                "Retry-After",
                "x-request-id",
                *(f"x-ratelimit-{a}-{b}" for a in ("limit", "remaining", "reset") for b in ("requests", "tokens")),
            ],
        )
    app.add_middleware(AccountingMiddleware, state=state)
    return app


__all__ = ["create_app", "error_response", "until_disconnect"]
