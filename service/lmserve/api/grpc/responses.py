"""lmserve.v1's Responses service: its messages <-> the neutral Responses call (api/responses.py), the same
conversion and store as POST /v1/responses. rpcs.py lists these handlers in METHODS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from lmserve.api.admission import Caller
from lmserve.api.errors import APIError
from lmserve.api.grpc.conversion import chat_tools, json_text_object, opt
from lmserve.api.plan import GenerationParams
from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.response_output import OutputItem, ResponseEvent, ResponseObject
from lmserve.api.responses import ResponsesInput, delete_response, get_response, prepare_response

if TYPE_CHECKING:
    from lmserve.state import AppState

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed")


# -- wire -> neutral ------------------------------------------------------------------------------------------


def _item(item: pb.ResponseInputItem) -> dict[str, Any]:
    kind = item.type or "message"
    if kind == "message":
        return {"type": kind, "role": item.role, "content": item.content}
    if kind == "function_call":
        return {"type": kind, "call_id": item.call_id, "name": item.name, "arguments": item.arguments or "{}"}
    if kind == "function_call_output":
        return {"type": kind, "call_id": item.call_id, "output": item.output}
    return {"type": kind}  # refused, naming the item, by input_messages


def _text_format(req: pb.CreateResponseRequest) -> dict[str, Any] | None:
    if not req.HasField("text_format"):
        return None
    fmt = req.text_format
    out: dict[str, Any] = {"type": fmt.type or "text"}
    if fmt.type == "json_schema":
        out["name"] = fmt.name
        out["schema"] = json_text_object(fmt.schema, "text_format.schema")
    return out


def responses_input(req: pb.CreateResponseRequest) -> ResponsesInput:
    if req.input and req.input_items:
        raise APIError("Give 'input' or 'input_items', not both.", "invalid_request", "input")
    openai_tools, choice = chat_tools(req)
    tools = [{"type": t["type"], **t["function"]} for t in openai_tools or ()]
    if isinstance(choice, dict):  # chat's named choice -> the Responses shape
        choice = {"type": "function", "name": choice["function"]["name"]}
    params = GenerationParams(
        **{name: opt(req, name) for name in SAMPLING_FIELDS},
        max_tokens=opt(req, "max_output_tokens"),
        default_max_tokens=None,
        prompt_param="input",
        max_tokens_param="max_output_tokens",
    )
    store = opt(req, "store")
    return ResponsesInput(
        opt(req, "model"), req.input if not req.input_items else [_item(i) for i in req.input_items], params,
        opt(req, "instructions"), tools or None, choice, opt(req, "parallel_tool_calls"), _text_format(req),
        store is not False, opt(req, "previous_response_id"),
    )  # fmt: skip


# -- neutral -> wire ------------------------------------------------------------------------------------------


def _output_item(item: OutputItem) -> pb.ResponseOutputItem:
    return pb.ResponseOutputItem(
        type=item.type, id=item.id, status=item.status, text=item.text, call_id=item.call_id, name=item.name,
        arguments=item.arguments,
    )  # fmt: skip


def response_message(r: ResponseObject) -> pb.Response:
    out = pb.Response(
        id=r.id, model=r.model, created_at=r.created_at, status=r.status, output=[_output_item(i) for i in r.output],
        incomplete_reason=r.incomplete_reason or "", output_text=r.output_text,
    )  # fmt: skip
    if r.previous_response_id is not None:
        out.previous_response_id = r.previous_response_id
    if r.usage is not None:
        u = r.usage
        out.usage.CopyFrom(
            pb.ResponseUsage(
                input_tokens=u.input_tokens, cached_tokens=u.cached_tokens, output_tokens=u.output_tokens,
                reasoning_tokens=u.reasoning_tokens, total_tokens=u.total_tokens,
            )  # fmt: skip
        )
    return out


def event_message(e: ResponseEvent) -> pb.ResponseEvent:
    out = pb.ResponseEvent(
        type=e.type, sequence_number=e.sequence_number, output_index=e.output_index, content_index=e.content_index,
        item_id=e.item_id, delta=e.delta, text=e.text,
    )  # fmt: skip
    if e.item is not None:
        out.item.CopyFrom(_output_item(e.item))
    if e.response is not None:
        out.response.CopyFrom(response_message(e.response))
    return out


# -- the rpcs -----------------------------------------------------------------------------------------------------


async def create_response(state: AppState, caller: Caller, req: pb.CreateResponseRequest) -> pb.Response:
    call = prepare_response(state, caller, responses_input(req))
    try:
        return response_message(await call.collect())
    finally:
        call.close()


async def create_response_stream(state: AppState, caller: Caller, req: pb.CreateResponseRequest) -> AsyncIterator[pb.ResponseEvent]:
    call = prepare_response(state, caller, responses_input(req))
    try:
        async with aclosing(call.events()) as events:
            async for event in events:
                yield event_message(event)
    finally:
        call.close()


def _response_id(req: pb.ResponseIdRequest) -> str:
    if not req.response_id:
        raise APIError("response_id is required.", "missing_field", "response_id")
    return req.response_id


async def get_response_rpc(state: AppState, caller: Caller, req: pb.ResponseIdRequest) -> pb.Response:
    return response_message(get_response(state, caller, _response_id(req)))


async def delete_response_rpc(state: AppState, caller: Caller, req: pb.ResponseIdRequest) -> pb.DeleteResponseResponse:
    response_id = _response_id(req)
    delete_response(state, caller, response_id)
    return pb.DeleteResponseResponse(id=response_id, deleted=True)


__all__ = ["create_response", "create_response_stream", "delete_response_rpc", "event_message", "get_response_rpc", "response_message"]
