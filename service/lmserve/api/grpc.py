"""The gRPC transport: `lmserve.v1` (protos/lmserve/v1/lmserve.proto) over the transport-neutral handlers.

    server = await start_grpc(state, host, port, tls)   # binds, serves; plus grpc.health.v1 and reflection
    ...
    await stop_grpc(server, grace_s)

Each RPC goes through one wrapper (`_unary` or `_stream`) that does what HTTP's middleware does:
accounting (request id from `x-request-id` metadata, in-flight, metrics under transport "grpc", one
access line), the API key from `authorization` metadata, and every APIError mapped through the one error
table to a gRPC status, with its string code (`lmserve-error-code`), the parameter (`lmserve-error-param`),
`retry-after` and the request id in trailing metadata. Messages arrive as raw bytes and are parsed here,
so a malformed message is INVALID_ARGUMENT rather than grpc's own deserialization failure.

A client cancel or an expired deadline cancels the handler's task, which closes the engine streams
(aborting the requests and freeing their KV blocks), exactly as an HTTP disconnect does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from lmserve.api.accounting import RequestOutcome, close_request, observe_error, open_request
from lmserve.api.admission import Caller, authenticate
from lmserve.api.errors import APIError
from lmserve.api.generation import ChoiceDelta, GenerationParams
from lmserve.api.structured import ResponseFormatInput, StructuredOutputsInput, resolve_structured
from lmserve.api.tools import ToolEvent, ToolStreamParser, parse_output
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
from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.state import readiness
from lmserve.types import GenerationDelta, TokenLogprob

if TYPE_CHECKING:
    from lmserve.state import AppState

log = logging.getLogger(__name__)

TRANSPORT = "grpc"
PACKAGE = "lmserve.v1"
SERVICES = ("Generation", "Embeddings", "Tokenization", "Models", "Moderations")
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
HEALTH_POLL_S = 0.25
# gRPC status names the accounting gives the HTTP status of (errors use their table entry's).
_HTTP_STATUS = {"OK": 200, "CANCELLED": 499, "DEADLINE_EXCEEDED": 504}


@dataclass(frozen=True)
class GrpcTLS:
    """Server certificate and key (PEM files); with `client_ca`, clients must present a certificate it signed."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = (self.key_file.read_bytes(), self.cert_file.read_bytes())
        client_ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


# -- wire -> neutral ----------------------------------------------------------------------------------------


def _opt(msg: Message, name: str) -> Any:
    """An `optional` field's value, None when unset (the server's default applies)."""
    return getattr(msg, name) if msg.HasField(name) else None


def _generation_params(
    req: pb.CompletionRequest | pb.ChatRequest,
    *,
    logprobs: int | None,
    default_max_tokens: int | None,
    max_logprobs: int,
    prompt_param: str,
) -> GenerationParams:
    n = _opt(req, "n")
    skip_special = _opt(req, "skip_special_tokens")
    return GenerationParams(
        max_tokens=_opt(req, "max_tokens"),
        n=1 if n is None else n,
        temperature=_opt(req, "temperature"),
        top_p=_opt(req, "top_p"),
        top_k=_opt(req, "top_k"),
        min_p=_opt(req, "min_p"),
        repetition_penalty=_opt(req, "repetition_penalty"),
        presence_penalty=_opt(req, "presence_penalty"),
        frequency_penalty=_opt(req, "frequency_penalty"),
        logit_bias={str(k): v for k, v in req.logit_bias.items()} or None,
        seed=_opt(req, "seed"),
        stop=tuple(req.stop),
        stop_token_ids=tuple(req.stop_token_ids),
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=True if skip_special is None else skip_special,
        include_stop_str_in_output=req.include_stop_str_in_output,
        speculative_tokens=_opt(req, "speculative_tokens"),
        structured=_structured(req),
        default_max_tokens=default_max_tokens,
        max_logprobs=max_logprobs,
        prompt_param=prompt_param,
    )


def _json_object(text: str, param: str) -> dict[str, Any] | None:
    """A JSON-text field holding an object (a schema); empty text is None."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise APIError(f"{param} is not valid JSON: {exc}.", "invalid_value", param) from None
    if not isinstance(value, dict):
        raise APIError(f"{param} must be a JSON object.", "invalid_value", param)
    return value


def _structured(req: pb.CompletionRequest | pb.ChatRequest) -> Any:
    fmt = None
    if req.HasField("response_format"):
        rf = req.response_format
        schema = _json_object(rf.json_schema.schema, "response_format.json_schema.schema") if rf.HasField("json_schema") else None
        fmt = ResponseFormatInput(rf.type or "text", schema, rf.HasField("json_schema"))
    so = None
    if req.HasField("structured_outputs"):
        which = req.structured_outputs.WhichOneof("constraint")
        value = getattr(req.structured_outputs, which) if which else None
        so = StructuredOutputsInput(
            json=value if which == "json" else None,
            regex=value if which == "regex" else None,
            choice=list(value.choices) if which == "choice" else None,
            grammar=value if which == "grammar" else None,
            json_object=value if which == "json_object" else None,
        )
    return resolve_structured(fmt, so)


def _tool_call_dict(call: pb.ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": call.type or "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}


def _chat_messages(messages: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise APIError(
                f"Unknown role '{m.role}'; use one of {', '.join(sorted(CHAT_ROLES))}.", "invalid_value", f"messages[{i}].role"
            )
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.HasField("name"):
            item["name"] = m.name
        if m.tool_calls:
            item["tool_calls"] = [_tool_call_dict(c) for c in m.tool_calls]
        if m.HasField("tool_call_id"):
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out


def _tools(req: pb.ChatRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """OpenAI-shaped tools and tool_choice from the proto's."""
    tools = []
    for i, t in enumerate(req.tools):
        function: dict[str, Any] = {"name": t.function.name}
        if t.function.HasField("description"):
            function["description"] = t.function.description
        parameters = _json_object(t.function.parameters, f"tools[{i}].function.parameters")
        if parameters is not None:
            function["parameters"] = parameters
        tools.append({"type": t.type or "function", "function": function})
    choice: Any = None
    if req.HasField("tool_choice"):
        which = req.tool_choice.WhichOneof("choice")
        if which == "mode":
            choice = req.tool_choice.mode
        elif which == "function_name":
            choice = {"type": "function", "function": {"name": req.tool_choice.function_name}}
    return tools or None, choice


def _completion_input(req: pb.CompletionRequest) -> CompletionInput:
    has_text, has_ids = req.HasField("prompt"), req.HasField("prompt_token_ids")
    if has_text == has_ids:
        raise APIError("Give exactly one of 'prompt' and 'prompt_token_ids'.", "invalid_request", "prompt")
    prompt: str | list[int] = req.prompt if has_text else list(req.prompt_token_ids.ids)
    logprobs = _opt(req, "logprobs")
    params = _generation_params(req, logprobs=logprobs, default_max_tokens=16, max_logprobs=5, prompt_param="prompt")
    return CompletionInput(_opt(req, "model"), prompt, params, req.echo)


def _chat_input(req: pb.ChatRequest) -> ChatInput:
    logprobs = chat_logprobs(req.logprobs, _opt(req, "top_logprobs"))
    params = _generation_params(req, logprobs=logprobs, default_max_tokens=None, max_logprobs=20, prompt_param="messages")
    add_generation_prompt = _opt(req, "add_generation_prompt")
    tools, tool_choice = _tools(req)
    return ChatInput(
        _opt(req, "model"),
        _chat_messages(req.messages),
        params,
        add_generation_prompt=True if add_generation_prompt is None else add_generation_prompt,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=_opt(req, "parallel_tool_calls"),
    )


# -- neutral -> wire ----------------------------------------------------------------------------------------


def _logprobs(logprobs: list[TokenLogprob] | None, num_top: int | None = None) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token=t.token,
            token_id=t.token_id,
            logprob=t.logprob,
            top_logprobs=[pb.TopLogprob(token=a.token, token_id=a.token_id, logprob=a.logprob) for a in t.top[:num_top]],
        )
        for t in logprobs or ()
    ]


def _stop_reason(reason: str | int | None) -> pb.StopReason | None:
    if reason is None:
        return None
    return pb.StopReason(stop_string=reason) if isinstance(reason, str) else pb.StopReason(stop_token_id=reason)


def _finish(reason: Any) -> str:
    return "" if reason is None else reason.value


def _usage(call: GenerationCall, usage: Any = None) -> pb.Usage:
    u = usage if usage is not None else call.usage
    return pb.Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        cached_tokens=u.cached_tokens,
    )


def _has_news(delta: GenerationDelta) -> bool:
    return bool(delta.text or delta.token_ids or delta.finish_reason is not None)


# -- the RPCs ---------------------------------------------------------------------------------------------


async def complete(state: AppState, caller: Caller, req: pb.CompletionRequest) -> pb.CompletionResponse:
    call = prepare_completion(state, caller, _completion_input(req))
    result = await call.collect()
    choices = []
    for c in result.choices:
        text = c.text if call.echo_texts is None else call.echo_texts[call.prompt_index(c.index)] + c.text
        choices.append(
            pb.CompletionChoice(
                index=c.index,
                text=text,
                token_ids=c.token_ids,
                logprobs=_logprobs(c.logprobs),
                finish_reason=_finish(c.finish_reason),
                stop_reason=_stop_reason(c.stop_reason),
            )
        )
    return pb.CompletionResponse(
        id=call.response_id, model=call.model.name, created=call.created, choices=choices, usage=_usage(call, result.usage)
    )


async def complete_stream(state: AppState, caller: Caller, req: pb.CompletionRequest) -> AsyncIterator[pb.CompletionChunk]:
    call = prepare_completion(state, caller, _completion_input(req))
    started = [False] * call.num_choices

    def chunk(item: ChoiceDelta) -> pb.CompletionChunk | None:
        i, delta = item.index, item.delta
        text = delta.text
        if not started[i]:
            started[i] = True
            if call.echo_texts is not None:
                text = call.echo_texts[call.prompt_index(i)] + text
        if not text and not _has_news(delta):
            return None
        choice = pb.CompletionChoice(
            index=i,
            text=text,
            token_ids=delta.token_ids,
            logprobs=_logprobs(delta.logprobs),
            finish_reason=_finish(delta.finish_reason),
            stop_reason=_stop_reason(delta.stop_reason),
        )
        return pb.CompletionChunk(id=call.response_id, model=call.model.name, created=call.created, choices=[choice])

    async for message in _chunks(call, chunk):
        yield message
    yield pb.CompletionChunk(id=call.response_id, model=call.model.name, created=call.created, usage=_usage(call))


def _tool_calls(events: list[ToolEvent]) -> list[pb.ToolCall]:
    """A chunk's tool-call pieces (OpenAI's delta shape: id, type and name on a call's first piece)."""
    out = []
    for e in events:
        if e.content is not None or (e.id is None and not e.arguments):
            continue
        out.append(
            pb.ToolCall(
                index=e.index,
                id=e.id or "",
                type="function" if e.id is not None else "",
                function=pb.FunctionCall(name=e.name or "", arguments=e.arguments or ""),
            )
        )
    return out


async def chat(state: AppState, caller: Caller, req: pb.ChatRequest) -> pb.ChatResponse:
    call = prepare_chat(state, caller, _chat_input(req))
    result = await call.collect()
    num_top = req.top_logprobs
    plan = call.tool_plan if call.tool_plan is not None and call.tool_plan.parses_calls else None
    choices = []
    for c in result.choices:
        content, calls, finish = c.text, [], _finish(c.finish_reason)
        if plan is not None:
            parsed = parse_output(plan, c.text)
            content = parsed.content or ""
            calls = [
                pb.ToolCall(index=k, id=t.id, type="function", function=pb.FunctionCall(name=t.name, arguments=t.arguments))
                for k, t in enumerate(parsed.tool_calls)
            ]
            finish = plan.finish_reason(bool(calls), c.finish_reason) or ""
        choices.append(
            pb.ChatChoice(
                index=c.index,
                role="assistant",
                content=content,
                token_ids=c.token_ids,
                logprobs=_logprobs(c.logprobs, num_top),
                finish_reason=finish,
                stop_reason=_stop_reason(c.stop_reason),
                tool_calls=calls,
            )
        )
    return pb.ChatResponse(
        id=call.response_id, model=call.model.name, created=call.created, choices=choices, usage=_usage(call, result.usage)
    )


async def chat_stream(state: AppState, caller: Caller, req: pb.ChatRequest) -> AsyncIterator[pb.ChatChunk]:
    call = prepare_chat(state, caller, _chat_input(req))
    started = [False] * call.num_choices
    num_top = req.top_logprobs
    plan = call.tool_plan if call.tool_plan is not None and call.tool_plan.parses_calls else None
    parsers = [ToolStreamParser(plan) for _ in range(call.num_choices)] if plan is not None else None

    def chunk(item: ChoiceDelta) -> pb.ChatChunk | None:
        i, delta = item.index, item.delta
        if not _has_news(delta):
            return None
        content, calls, finish = delta.text, [], _finish(delta.finish_reason)
        if parsers is not None and plan is not None:
            events = parsers[i].feed(delta.text)
            if delta.finish_reason is not None:
                events += parsers[i].finish()
                finish = plan.finish_reason(bool(parsers[i].calls), delta.finish_reason) or ""
            content = "".join(e.content for e in events if e.content is not None)
            calls = _tool_calls(events)
        choice = pb.ChatChoice(
            index=i,
            role="" if started[i] else "assistant",
            content=content,
            token_ids=delta.token_ids,
            logprobs=_logprobs(delta.logprobs, num_top),
            finish_reason=finish,
            stop_reason=_stop_reason(delta.stop_reason),
            tool_calls=calls,
        )
        started[i] = True
        return pb.ChatChunk(id=call.response_id, model=call.model.name, created=call.created, choices=[choice])

    async for message in _chunks(call, chunk):
        yield message
    yield pb.ChatChunk(id=call.response_id, model=call.model.name, created=call.created, usage=_usage(call))


async def _chunks(call: GenerationCall, chunk: Callable[[ChoiceDelta], Message | None]) -> AsyncIterator[Any]:
    try:
        async with contextlib.aclosing(call.stream()) as stream:
            async for item in stream:
                message = chunk(item)
                if message is not None:
                    yield message
    finally:
        call.close()


async def embed(state: AppState, caller: Caller, req: pb.EmbedRequest) -> pb.EmbedResponse:
    if req.input and req.input_token_ids:
        raise APIError("Give 'input' or 'input_token_ids', not both.", "invalid_request", "input")
    inputs: list[str] | list[list[int]] = list(req.input) or [list(t.ids) for t in req.input_token_ids]
    call = await prepare_embedding(state, caller, EmbedInput(_opt(req, "model"), inputs, _opt(req, "dimensions")))
    result = await call.run()
    return pb.EmbedResponse(
        model=result.model.name,
        data=[pb.Embedding(index=i, embedding=v) for i, v in enumerate(result.vectors)],
        usage=pb.Usage(prompt_tokens=result.total_tokens, total_tokens=result.total_tokens),
    )


async def tokenize_rpc(state: AppState, caller: Caller, req: pb.TokenizeRequest) -> pb.TokenizeResponse:
    add_special = _opt(req, "add_special_tokens")
    add_generation_prompt = _opt(req, "add_generation_prompt")
    inp = TokenizeInput(
        model=_opt(req, "model"),
        prompt=_opt(req, "prompt"),
        messages=_chat_messages(req.messages) if req.messages else None,
        add_special_tokens=True if add_special is None else add_special,
        add_generation_prompt=True if add_generation_prompt is None else add_generation_prompt,
        return_token_strs=req.return_token_strs,
    )
    out = tokenize(state, inp)
    return pb.TokenizeResponse(
        count=len(out.tokens), max_model_len=out.max_model_len, tokens=out.tokens, token_strs=out.token_strs or ()
    )


async def detokenize_rpc(state: AppState, caller: Caller, req: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
    return pb.DetokenizeResponse(prompt=detokenize(state, _opt(req, "model"), list(req.tokens)))


async def list_models(state: AppState, caller: Caller, req: pb.ListModelsRequest) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        data=[
            pb.Model(
                id=m.served.name, created=m.served.created, owned_by="lmserve", max_model_len=m.max_model_len, kind=m.kind,
                family=m.family, parent=m.served.parent or "", root=m.served.root or "",
            )
            for m in served_models(state)
        ]
    )


async def moderate_rpc(state: AppState, caller: Caller, req: pb.ModerationRequest) -> pb.ModerationResponse:
    out = moderate(state, caller, _opt(req, "model"), list(req.input))
    return pb.ModerationResponse(
        id=out.id,
        model=out.model,
        results=[
            pb.ModerationResult(flagged=r.flagged, categories=r.categories, category_scores=r.category_scores)
            for r in out.results
        ],
    )


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    request_type: type[Message]
    response_type: type[Message]
    handler: Callable[[AppState, Caller, Any], Any]  # a coroutine, or an async generator when streaming
    is_stream: bool = False

    @property
    def path(self) -> str:
        return f"/{PACKAGE}.{self.service}/{self.name}"


async def load_lora_rpc(state: AppState, caller: Caller, req: pb.LoadLoraAdapterRequest) -> pb.LoraAdapterResponse:
    _require(lora_name=req.lora_name, lora_path=req.lora_path)
    return pb.LoraAdapterResponse(message=await load_lora_adapter(state, caller, req.lora_name, req.lora_path))


async def unload_lora_rpc(state: AppState, caller: Caller, req: pb.UnloadLoraAdapterRequest) -> pb.LoraAdapterResponse:
    _require(lora_name=req.lora_name)
    return pb.LoraAdapterResponse(message=await unload_lora_adapter(state, caller, req.lora_name))


def _require(**fields: str) -> None:
    """proto3 strings have no "unset": an empty one is a missing field."""
    for name, value in fields.items():
        if not value:
            raise APIError(f"{name} is required.", "missing_field", name)


METHODS = (
    Method("Generation", "Complete", pb.CompletionRequest, pb.CompletionResponse, complete),
    Method("Generation", "CompleteStream", pb.CompletionRequest, pb.CompletionChunk, complete_stream, is_stream=True),
    Method("Generation", "Chat", pb.ChatRequest, pb.ChatResponse, chat),
    Method("Generation", "ChatStream", pb.ChatRequest, pb.ChatChunk, chat_stream, is_stream=True),
    Method("Embeddings", "Embed", pb.EmbedRequest, pb.EmbedResponse, embed),
    Method("Tokenization", "Tokenize", pb.TokenizeRequest, pb.TokenizeResponse, tokenize_rpc),
    Method("Tokenization", "Detokenize", pb.DetokenizeRequest, pb.DetokenizeResponse, detokenize_rpc),
    Method("Models", "ListModels", pb.ListModelsRequest, pb.ListModelsResponse, list_models),
    Method("Models", "LoadLoraAdapter", pb.LoadLoraAdapterRequest, pb.LoraAdapterResponse, load_lora_rpc),
    Method("Models", "UnloadLoraAdapter", pb.UnloadLoraAdapterRequest, pb.LoraAdapterResponse, unload_lora_rpc),
    Method("Moderations", "Moderate", pb.ModerationRequest, pb.ModerationResponse, moderate_rpc),
)


# -- the wrapper every RPC goes through ----------------------------------------------------------------------


class _Call:
    """One RPC's accounting and error mapping, shared by the unary and the streaming wrapper."""

    def __init__(self, state: AppState, method: Method, context: grpc.aio.ServicerContext) -> None:
        self.state = state
        self.method = method
        self.context = context
        self.metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.record = open_request(state, TRANSPORT, self.metadata.get("x-request-id"))
        self.grpc_status = "OK"
        self.http_status = 200

    def caller_and_request(self, raw: bytes) -> tuple[Caller, Message]:
        client_address = _peer_host(self.context.peer())
        key_id = authenticate(self.state, self.metadata.get("authorization"), client_address)
        try:
            request = self.method.request_type.FromString(raw)
        except DecodeError:
            raise APIError(
                f"The message is not a valid {self.method.request_type.DESCRIPTOR.full_name}.", "invalid_request"
            ) from None
        unknown = _unknown_fields(request)
        if unknown is not None:
            raise APIError(unknown, "unknown_field")
        return Caller(self.record, key_id), request

    def trailers(self, headers: dict[str, str], error: APIError | None = None) -> tuple[tuple[str, str], ...]:
        items = [("x-request-id", self.record.request_id)]
        if error is not None:
            items.append(("lmserve-error-code", error.code))
            if error.param:
                items.append(("lmserve-error-param", error.param))
        items += [(k.lower(), v) for k, v in headers.items() if v.isascii()]
        return tuple(items)

    def succeed(self, caller: Caller) -> None:
        self.context.set_trailing_metadata(self.trailers(caller.response_headers))

    def as_error(self, exc: BaseException) -> APIError:
        if isinstance(exc, APIError):
            return exc
        log.error("unhandled error in %s", self.method.path, exc_info=exc)
        return APIError("Internal server error.", "internal_error")

    async def fail(self, error: APIError) -> None:
        """Record the error and end the RPC with its status (raises, as context.abort does)."""
        observe_error(self.state, self.record, error.code)
        self.grpc_status = error.grpc_status
        self.http_status = error.http_status
        await self.context.abort(
            grpc.StatusCode[error.grpc_status], error.message, trailing_metadata=self.trailers(error.headers, error)
        )

    def cancelled(self) -> None:
        try:
            remaining = self.context.time_remaining()
        except Exception:  # the call is already torn down: no deadline to read
            remaining = None
        self.grpc_status = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
        self.http_status = _HTTP_STATUS[self.grpc_status]

    def close(self) -> None:
        outcome = RequestOutcome(
            "POST", self.method.path, self.method.path, self.http_status, self.grpc_status, self.metadata.get("traceparent")
        )
        close_request(self.state, self.record, outcome)


def _unknown_fields(request: Message) -> str | None:
    """Why the request is refused for fields this server's schema lacks (a newer client's, a typo in a
    hand-built message), or None. Proto3 would keep and ignore them; like HTTP, lmserve says so instead,
    since a setting silently dropped changes what the client gets."""
    stripped = type(request)()
    stripped.CopyFrom(request)
    stripped.DiscardUnknownFields()  # recursive: nested messages too
    if stripped.ByteSize() == request.ByteSize():
        return None
    name = request.DESCRIPTOR.full_name
    numbers = sorted({f.field_number for f in unknown_fields.UnknownFieldSet(request)})
    where = f"field number {', '.join(map(str, numbers))}" if numbers else "fields in a nested message"
    return f"The {name} holds {where}, unknown to this server's lmserve.v1 schema."


def _peer_host(peer: str | None) -> str | None:
    """'ipv4:127.0.0.1:5000' -> '127.0.0.1'; '[::1]' forms keep their brackets off."""
    if not peer:
        return None
    _, _, address = peer.partition(":")
    host, _, _ = address.rpartition(":")
    return host.strip("[]") or None


def _cancel_on_termination(context: grpc.aio.ServicerContext) -> None:
    """Cancel the running handler as soon as the call ends under it (a client cancel, an expired deadline),
    so that its engine requests are aborted at once; grpc by itself notices a cancelled stream only at its
    next send, which the safety filter's hold or a long prefill can put far off."""
    task = asyncio.current_task()
    assert task is not None

    def on_done(_: object) -> None:
        if context.cancelled() and not task.done():
            task.cancel()

    context.add_done_callback(on_done)


def _unary(state: AppState, method: Method) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]:
    async def behavior(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        rpc = _Call(state, method, context)
        try:
            try:
                caller, request = rpc.caller_and_request(raw)
                _cancel_on_termination(context)
                response = await method.handler(state, caller, request)
            except asyncio.CancelledError:
                rpc.cancelled()
                raise
            except Exception as exc:
                await rpc.fail(rpc.as_error(exc))
                raise AssertionError("unreachable: abort raises") from exc
            rpc.succeed(caller)
            return response
        finally:
            rpc.close()

    return behavior


def _stream(state: AppState, method: Method) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[Message]]:
    async def behavior(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Message]:
        rpc = _Call(state, method, context)
        try:
            try:
                caller, request = rpc.caller_and_request(raw)
                _cancel_on_termination(context)
                async with contextlib.aclosing(method.handler(state, caller, request)) as messages:
                    async for message in messages:
                        yield message
            except (asyncio.CancelledError, GeneratorExit):
                # A cancel lands either in this generator's await (CancelledError) or, when grpc was
                # sending, as the generator being closed (GeneratorExit).
                rpc.cancelled()
                raise
            except Exception as exc:
                await rpc.fail(rpc.as_error(exc))
                raise AssertionError("unreachable: abort raises") from exc
            rpc.succeed(caller)
        finally:
            rpc.close()

    return behavior


def _handlers(state: AppState) -> dict[str, dict[str, grpc.RpcMethodHandler]]:
    by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for m in METHODS:
        if m.is_stream:
            handler = grpc.unary_stream_rpc_method_handler(
                _stream(state, m), request_deserializer=None, response_serializer=m.response_type.SerializeToString
            )
        else:
            handler = grpc.unary_unary_rpc_method_handler(
                _unary(state, m), request_deserializer=None, response_serializer=m.response_type.SerializeToString
            )
        by_service.setdefault(f"{PACKAGE}.{m.service}", {})[m.name] = handler
    return by_service


# -- health and the server --------------------------------------------------------------------------------


class HealthReporter:
    """Keeps grpc.health.v1 in step with readiness: SERVING only when ready (not draining, engine alive)."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.servicer = HealthServicer()
        self.names = ("", *(f"{PACKAGE}.{s}" for s in SERVICES))
        self._task: asyncio.Task[None] | None = None

    async def update(self) -> None:
        ready = readiness(self.state) is None
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.names:
            await self.servicer.set(name, status)

    async def _poll(self) -> None:
        while True:
            await self.update()
            await asyncio.sleep(HEALTH_POLL_S)

    async def start(self) -> None:
        await self.update()
        self._task = asyncio.create_task(self._poll(), name="grpc-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.servicer.enter_graceful_shutdown()


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int  # the bound port (the one the OS picked when asked for 0)
    health: HealthReporter

    async def stop(self, grace_s: float) -> None:
        await self.health.stop()
        await self.server.stop(grace_s)


async def start_grpc(state: AppState, host: str, port: int, tls: GrpcTLS | None = None) -> GrpcServer:
    """Bind and start the gRPC server on the running loop, over `state`."""
    limits = state.config.limits
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limits.max_request_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
    )
    for service, handlers in _handlers(state).items():
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)
    health = HealthReporter(state)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    names = [*(f"{PACKAGE}.{s}" for s in SERVICES), health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"gRPC could not bind {address}")
    await server.start()
    await health.start()
    return GrpcServer(server, bound, health)


__all__ = ["METHODS", "GrpcServer", "GrpcTLS", "start_grpc"]
