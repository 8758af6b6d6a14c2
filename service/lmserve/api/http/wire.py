"""OpenAI's request bodies -> the transport-neutral inputs (api/generation_call.py and the other calls):
the parameters as the client sent them, and the names it sent them under, for errors."""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request

from lmserve.api.admission import Caller
from lmserve.api.errors import APIError
from lmserve.api.http import schemas
from lmserve.api.http.middleware import KEY_ID_SCOPE, access_record
from lmserve.api.generation_call import ChatInput, CompletionInput
from lmserve.api.plan import CLIENT_FIELDS, GenerationParams, chat_logprobs
from lmserve.api.structured import ResponseFormatInput, StructuredOutputsInput, resolve_structured

_IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image", "image_file"})
TIMEOUT_HEADER = "x-request-timeout"


def caller(request: Request) -> Caller:
    """The request's Caller (AuthMiddleware sets the key id; AccountingMiddleware the record)."""
    return Caller(access_record(request.scope), str(request.scope.get(KEY_ID_SCOPE, "anonymous")))


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
    logprobs_param: str = "logprobs",
    request: Request | None = None,
) -> GenerationParams:
    timeout_s, timeout_param = request_timeout(body, request)
    return GenerationParams(
        **{name: getattr(body, name) for name in CLIENT_FIELDS},
        max_tokens=max_tokens,
        n=body.n,
        logit_bias=body.logit_bias,
        priority=body.priority,
        stop=_stop_tuple(body.stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
        structured=resolve_structured(_response_format(body.response_format), _structured_outputs(body.structured_outputs)),
        default_max_tokens=default_max_tokens,
        max_logprobs=max_logprobs,
        prompt_param=prompt_param,
        max_tokens_param=max_tokens_param,
        logprobs_param=logprobs_param,
        timeout_s=timeout_s,
        timeout_param=timeout_param,
        return_tokens_as_token_ids=bool(body.return_tokens_as_token_ids),
    )

def request_timeout(body: Any, request: Request | None) -> tuple[float | None, str]:
    """The request's deadline in seconds (the smaller of the body's `timeout` field and the
    x-request-timeout header) and the parameter it came from, for errors."""
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


def embedding_inputs(raw: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    if isinstance(raw, str):
        return [raw]
    if raw and isinstance(raw[0], int):
        return [raw]  # type: ignore[list-item]
    return raw  # type: ignore[return-value]


def completion_input(body: schemas.CompletionRequest, request: Request) -> CompletionInput:
    if body.suffix is not None:
        raise APIError("suffix is not supported.", "unsupported_parameter", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError("best_of must equal n: this server does not rank candidate completions.", "unsupported_value", "best_of")
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
    return CompletionInput(body.model, body.prompt, params, body.echo, body.add_special_tokens)


def chat_input(body: schemas.ChatCompletionRequest, request: Request) -> ChatInput:
    use_mct = body.max_completion_tokens is not None
    params = _generation_params(
        body,
        max_tokens=body.max_completion_tokens if use_mct else body.max_tokens,
        default_max_tokens=None,
        logprobs=chat_logprobs(body.logprobs, body.top_logprobs),
        max_logprobs=20,
        prompt_param="messages",
        max_tokens_param="max_completion_tokens" if use_mct else "max_tokens",
        logprobs_param="top_logprobs",
        request=request,
    )
    return ChatInput(
        body.model,
        chat_messages(body.messages),
        params,
        body.add_generation_prompt,
        body.tools,
        body.chat_template_kwargs,
        body.tool_choice,
        body.parallel_tool_calls,
        body.add_special_tokens,
    )
