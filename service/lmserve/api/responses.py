"""OpenAI's Responses API over the chat path, transport-neutral: a Responses request becomes a chat call
(api/generation_call.py prepare_chat), its presented choice becomes output items and typed events
(api/response_output.py), and a stored response its conversation for the next turn (api/response_store.py).

    call = prepare_response(state, caller, ResponsesInput(...))   # 404 for an unknown previous_response_id
    response = await call.collect()                               # or: async for event in call.events(): ...
    get_response(state, caller, response_id) / delete_response(...)

What maps onto what: `input` (a string: one user turn; or items: `message`s with text parts,
`function_call`s and `function_call_output`s) and `instructions` (a system turn first, not carried to
the next turn, as OpenAI does) -> chat messages; function `tools` and `tool_choice` -> chat's (OpenAI's
flat Responses shape to chat's nested one); `text.format` (json_schema / json_object) -> the same
constraint as chat's response_format; `max_output_tokens` and the sampling fields -> GenerationParams.
With `previous_response_id`, the stored response's conversation (its input and output as chat messages)
comes before the new input. Only one choice: the Responses API has no `n`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from itertools import count
from typing import TYPE_CHECKING, Any

from lmserve.api.account import Usage
from lmserve.api.admission import Caller
from lmserve.api.auth import OPEN_KEY_ID
from lmserve.api.errors import APIError
from lmserve.api.generation_call import ChatInput, GenerationCall, prepare_chat
from lmserve.api.plan import GenerationParams
from lmserve.api.reasoning import reasoning_token_count
from lmserve.api.response_output import (
    OutputAssembler,
    OutputItem,
    ResponseEvent,
    ResponseObject,
    ResponseUsage,
    response_status,
)
from lmserve.api.response_store import ResponseStore, StoredResponse
from lmserve.api.structured import ResponseFormatInput, from_response_format
from lmserve.types import StructuredOutput

if TYPE_CHECKING:
    from lmserve.state import AppState

MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


@dataclass(frozen=True)
class ResponsesInput:
    """A Responses request as a transport parsed it; `input` items, `tools`, `tool_choice` and
    `text_format` in OpenAI's JSON shapes (gRPC builds the same dicts from its messages)."""

    model: str | None
    input: str | list[dict[str, Any]]
    params: GenerationParams  # without `structured`: text_format is resolved here
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "name": ...}
    parallel_tool_calls: bool | None = None
    text_format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", "schema", ...}
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None


# -- the request -> chat's inputs ------------------------------------------------------------------------------


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (input_text / output_text) joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError("A message's content must be a string or a list of content parts.", "invalid_type", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise APIError(
                f"Content part type {kind!r} is not supported; only text parts (input_text, output_text) are.",
                "unsupported_value",
                f"{where}.content[{j}].type",
            )
        if not isinstance(part.get("text"), str):
            raise APIError("A text content part needs 'text'.", "missing_field", f"{where}.content[{j}].text")
        texts.append(part["text"])
    return "\n".join(texts)


def _required_str(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not value:
        raise APIError(f"A {item.get('type')} item needs '{name}'.", "missing_field", f"{where}.{name}")
    return value


def input_messages(items: str | list[dict[str, Any]], param: str = "input") -> list[dict[str, Any]]:
    """Responses input items -> chat messages: messages as they are, function calls as an assistant turn's
    tool_calls (consecutive calls in one turn), their outputs as tool turns. Reasoning items are dropped
    (an earlier turn's thinking is not prompted again)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise APIError("Each input item must be an object.", "invalid_type", where)
        kind = item.get("type") or "message"
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in MESSAGE_ROLES:
                raise APIError(f"A message's role must be one of {sorted(MESSAGE_ROLES)}, got {role!r}.", "invalid_value", f"{where}.role")
            out.append({"role": role, "content": _text(item.get("content", ""), where)})
        elif kind == "function_call":
            arguments = item.get("arguments", "{}")
            call = {
                "id": _required_str(item, "call_id", where), "type": "function",
                "function": {"name": _required_str(item, "name", where), "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)},
            }  # fmt: skip
            if out and out[-1]["role"] == "assistant":
                out[-1] = {**out[-1], "tool_calls": [*out[-1].get("tool_calls", ()), call]}
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            text = output if isinstance(output, str) else _text(output, f"{where}.output")
            out.append({"role": "tool", "tool_call_id": _required_str(item, "call_id", where), "content": text})
        elif kind == "reasoning":
            continue
        else:
            raise APIError(
                f"Input item type {kind!r} is not supported; use message, function_call or function_call_output.",
                "unsupported_value",
                f"{where}.type",
            )
    return out


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses' function tools ({"type": "function", "name", "description", "parameters", "strict"}) ->
    chat's; hosted tools (web search, file search, ...) are refused."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise APIError(f"Tool type {kind!r} is not supported; only 'function' tools are.", "unsupported_value", f"tools[{i}].type")
        function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(tool_choice: Any) -> Any:
    if tool_choice is None or tool_choice in ("none", "auto", "required"):
        return tool_choice
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(tool_choice.get("name"), str):
        return {"type": "function", "function": {"name": tool_choice["name"]}}
    raise APIError(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}.", "invalid_value", "tool_choice"
    )


def text_constraint(fmt: dict[str, Any] | None) -> StructuredOutput | None:
    """`text.format` -> the constraint chat's response_format gives."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise APIError(
            f"text.format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'.",
            "invalid_value",
            "text.format.type",
        )
    constraint = from_response_format(ResponseFormatInput(kind, fmt.get("schema"), kind == "json_schema"))
    return None if constraint is None else replace(constraint, param=f"text.format{'.schema' if kind == 'json_schema' else ''}")


# -- the call ------------------------------------------------------------------------------------------------


def _owner(state: AppState, caller: Caller) -> str:
    """Whose stored responses these are: the API key's; with auth off, every caller's alike."""
    return caller.key_id if state.keys.is_enabled else OPEN_KEY_ID


def _store(state: AppState) -> ResponseStore:
    assert state.responses is not None, "app.state_from_models builds the store"
    return state.responses


def _not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(f"No response with id '{response_id}' was found.", "not_found", param)


def item_dict(item: OutputItem) -> dict[str, Any]:
    """An output item in OpenAI's JSON shape (the HTTP body; the store's conversation is built from it)."""
    if item.type == "message":
        text = {"type": "output_text", "text": item.text, "annotations": [], "logprobs": []}
        return {"type": "message", "id": item.id, "status": item.status, "role": "assistant", "content": [text]}
    if item.type == "reasoning":
        return {"type": "reasoning", "id": item.id, "status": item.status, "summary": [], "content": [{"type": "reasoning_text", "text": item.text}]}
    return {
        "type": "function_call", "id": item.id, "status": item.status, "call_id": item.call_id, "name": item.name,
        "arguments": item.arguments,
    }  # fmt: skip


@dataclass
class ResponseCall:
    """An admitted Responses request: run it once, with `collect()` or `events()`."""

    state: AppState
    caller: Caller
    call: GenerationCall
    inp: ResponsesInput
    history: list[dict[str, Any]]  # the conversation before this turn's output, instructions left out
    assembler: OutputAssembler = field(default_factory=OutputAssembler)

    @property
    def response_id(self) -> str:
        return self.call.response_id

    def request_echo(self) -> dict[str, Any]:
        inp = self.inp
        return {
            "instructions": inp.instructions, "max_output_tokens": inp.params.max_tokens,
            "temperature": inp.params.temperature, "top_p": inp.params.top_p, "tools": inp.tools or [],
            "tool_choice": inp.tool_choice if inp.tool_choice is not None else "auto",
            "parallel_tool_calls": inp.parallel_tool_calls is not False,
            "text": {"format": inp.text_format or {"type": "text"}}, "store": inp.store, "metadata": inp.metadata or {},
        }  # fmt: skip

    def reasoning_tokens(self) -> int:
        """The output tokens of the thinking (a reasoning parser's), for usage.output_tokens_details."""
        if not self.assembler.thought:
            return 0
        tokenizer = self.state.tokenizer
        return reasoning_token_count(self.assembler.token_ids, lambda ids: tokenizer.decode(ids, skip_special_tokens=False))

    def response(self, status: str, usage: Usage | None = None, reason: str | None = None) -> ResponseObject:
        return ResponseObject(
            id=self.response_id, created_at=self.call.created, model=self.call.model.name, status=status,
            output=tuple(self.assembler.items),
            usage=None if usage is None else ResponseUsage(
                usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens, self.reasoning_tokens()
            ),
            incomplete_reason=reason, previous_response_id=self.inp.previous_response_id, request=self.request_echo(),
        )  # fmt: skip

    def _finished(self, usage: Usage) -> ResponseObject:
        status, reason = response_status(self.assembler.finish_reason)
        response = self.response(status, usage, reason)
        if self.inp.store:
            output = input_messages([item_dict(i) for i in response.output], "output")
            messages = tuple(self.history + output)
            num_bytes = len(json.dumps([item_dict(i) for i in response.output])) + len(json.dumps(messages))
            _store(self.state).put(StoredResponse(response.id, _owner(self.state, self.caller), response, messages, num_bytes))
        return response

    async def collect(self) -> ResponseObject:
        result = await self.call.collect()
        self.assembler.feed(result.choices[0])
        self.assembler.finish()
        return self._finished(result.usage)

    async def events(self) -> AsyncIterator[ResponseEvent]:
        """The typed events, numbered; nothing is sent before the first piece is there, so whatever fails
        before it (a timeout, an overloaded queue) raises as a plain error instead."""
        numbers = count()

        def numbered(events: list[ResponseEvent]) -> list[ResponseEvent]:
            return [replace(e, sequence_number=next(numbers)) for e in events]

        async with aclosing(self.call.stream()) as stream:
            first = await anext(stream, None)
            head = self.response("in_progress")
            for event in numbered([ResponseEvent("response.created", response=head), ResponseEvent("response.in_progress", response=head)]):
                yield event
            if first is not None:
                for event in numbered(self.assembler.feed(first)):
                    yield event
            async for piece in stream:
                for event in numbered(self.assembler.feed(piece)):
                    yield event
        for event in numbered(self.assembler.finish()):
            yield event
        response = self._finished(self.call.usage)
        kind = "response.completed" if response.status == "completed" else "response.incomplete"
        yield numbered([ResponseEvent(kind, response=response)])[0]

    def close(self) -> None:
        self.call.close()


def prepare_response(state: AppState, caller: Caller, inp: ResponsesInput) -> ResponseCall:
    """Check the request, find the earlier turn, and admit the chat call; APIError before any work."""
    history: list[dict[str, Any]] = []
    if inp.previous_response_id is not None:
        previous = _store(state).get(_owner(state, caller), inp.previous_response_id)
        if previous is None:
            raise _not_found(inp.previous_response_id, "previous_response_id")
        history = list(previous.messages)
    history += input_messages(inp.input)
    if not history:
        raise APIError("The input must hold at least one item.", "missing_field", "input")
    messages = ([{"role": "system", "content": inp.instructions}] if inp.instructions else []) + history
    params = replace(inp.params, structured=text_constraint(inp.text_format))
    chat = ChatInput(
        inp.model, messages, params, tools=chat_tools(inp.tools), tool_choice=chat_tool_choice(inp.tool_choice),
        parallel_tool_calls=inp.parallel_tool_calls,
    )  # fmt: skip
    call = prepare_chat(state, caller, chat, prefix="resp")
    return ResponseCall(state, caller, call, inp, history)


def get_response(state: AppState, caller: Caller, response_id: str) -> ResponseObject:
    entry = _store(state).get(_owner(state, caller), response_id)
    if entry is None:
        raise _not_found(response_id)
    return entry.response


def delete_response(state: AppState, caller: Caller, response_id: str) -> None:
    if not _store(state).delete(_owner(state, caller), response_id):
        raise _not_found(response_id)


__all__ = [
    "ResponseCall", "ResponsesInput", "chat_tool_choice", "chat_tools", "delete_response", "get_response", "input_messages",
    "item_dict", "prepare_response", "text_constraint",
]  # fmt: skip
