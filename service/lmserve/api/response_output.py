"""A Responses API answer, built from a chat call's presented choice (api/presentation.py): its output
items, and while streaming the typed events that build them, transport-neutral.

    assembler = OutputAssembler(response_id)
    events = assembler.feed(piece)   # each PresentedChoice: output_item.added, output_text.delta, ...
    events += assembler.finish()     # closes the open item: *.done, output_item.done
    assembler.items                  # the output items, whole
    response_status(finish_reason)   # ("completed" | "incomplete", the incomplete reason or None)

Output items follow what the choice says, in its order: its reasoning (a `reasoning` item, when a
reasoning parser set `PresentedChoice.reasoning`), its text (a `message` item with one `output_text`
part) and each tool call (a `function_call` item, its arguments streamed as they come). A choice with
neither text nor calls still answers one empty message. http/ and grpc/ only serialize these.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from lmserve.api.presentation import PresentedChoice


@dataclass(frozen=True)
class OutputItem:
    """One output item: type "message" (text), "function_call" or "reasoning" (text: the reasoning)."""

    type: str
    id: str
    status: str  # in_progress | completed | incomplete
    text: str = ""
    call_id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class ResponseUsage:
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    # Tokens of reasoning among output_tokens: 0 here, since the engine counts a choice's tokens whole and
    # the reasoning parser splits text, not tokens (docs/http-api.md says so).
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class ResponseObject:
    """The Response as the client gets it (and the store keeps it); `request` echoes the request's own
    settings (instructions, max_output_tokens, temperature, tools, ...) as OpenAI's object carries them."""

    id: str
    created_at: int
    model: str
    status: str  # in_progress | completed | incomplete
    output: tuple[OutputItem, ...] = ()
    usage: ResponseUsage | None = None
    incomplete_reason: str | None = None  # max_output_tokens | content_filter
    previous_response_id: str | None = None
    request: dict[str, Any] = field(default_factory=dict)

    @property
    def output_text(self) -> str:
        return "".join(item.text for item in self.output if item.type == "message")


@dataclass(frozen=True)
class ResponseEvent:
    """One streamed event; the fields its `type` does not use stay at their defaults. `sequence_number`
    counts the stream's events from 0."""

    type: str
    sequence_number: int = 0
    output_index: int = 0
    content_index: int = 0
    item_id: str = ""
    delta: str = ""
    text: str = ""  # *.done: the whole text / arguments
    item: OutputItem | None = None
    response: ResponseObject | None = None
    error_code: str = ""  # type "error"
    error_param: str | None = None


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_status(finish_reason: str | None) -> tuple[str, str | None]:
    """The response's status and incomplete reason from its choice's finish_reason."""
    if finish_reason == "length":
        return "incomplete", "max_output_tokens"
    if finish_reason == "content_filter":
        return "incomplete", "content_filter"
    if finish_reason in ("timeout", "abort"):
        return "incomplete", None
    return "completed", None


class OutputAssembler:
    """Builds one choice's output items from its presented pieces, with the events a stream sends."""

    def __init__(self) -> None:
        self.items: list[OutputItem] = []
        self._open: int | None = None  # the output index of the item still growing
        self._calls: dict[int, int] = {}  # a tool call's index among the choice's calls -> its output index
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []  # the choice's output tokens, for the reasoning's share of them
        self.thought = False  # some of the output was reasoning

    def _add(self, item: OutputItem) -> list[ResponseEvent]:
        events = self._close()
        self.items.append(item)
        self._open = index = len(self.items) - 1
        events.append(ResponseEvent("response.output_item.added", output_index=index, item=item))
        if item.type == "message":
            events.append(ResponseEvent("response.content_part.added", output_index=index, item_id=item.id))
        return events

    def _grow(self, index: int, **more: str) -> None:
        item = self.items[index]
        self.items[index] = replace(item, **{k: getattr(item, k) + v for k, v in more.items()})

    def _close(self, status: str = "completed") -> list[ResponseEvent]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        item = self.items[index] = replace(self.items[index], status=status)
        events = []
        if item.type == "message":
            events.append(ResponseEvent("response.output_text.done", output_index=index, item_id=item.id, text=item.text))
            events.append(ResponseEvent("response.content_part.done", output_index=index, item_id=item.id, text=item.text))
        elif item.type == "reasoning":
            events.append(ResponseEvent("response.reasoning_text.done", output_index=index, item_id=item.id, text=item.text))
        else:
            events.append(
                ResponseEvent("response.function_call_arguments.done", output_index=index, item_id=item.id, text=item.arguments)
            )
        events.append(ResponseEvent("response.output_item.done", output_index=index, item=item))
        return events

    def _open_type(self) -> str | None:
        return None if self._open is None else self.items[self._open].type

    def feed(self, piece: PresentedChoice) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        self.token_ids += piece.token_ids
        self.thought = self.thought or bool(piece.reasoning)
        if piece.reasoning:
            if self._open_type() != "reasoning":
                events += self._add(OutputItem("reasoning", new_item_id("rs"), "in_progress"))
            index = self._open
            assert index is not None
            self._grow(index, text=piece.reasoning)
            item_id = self.items[index].id
            events.append(ResponseEvent("response.reasoning_text.delta", output_index=index, item_id=item_id, delta=piece.reasoning))
        if piece.content:
            if self._open_type() != "message":
                events += self._add(OutputItem("message", new_item_id("msg"), "in_progress"))
            index = self._open
            assert index is not None
            self._grow(index, text=piece.content)
            item_id = self.items[index].id
            events.append(ResponseEvent("response.output_text.delta", output_index=index, item_id=item_id, delta=piece.content))
        for call in piece.tool_calls:
            if call.id is not None:  # a call's first piece: a new item
                item = OutputItem("function_call", new_item_id("fc"), "in_progress", call_id=call.id, name=call.name or "")
                events += self._add(item)
                self._calls[call.index] = len(self.items) - 1
            index = self._calls[call.index]
            if call.arguments:
                self._grow(index, arguments=call.arguments)
                item_id = self.items[index].id
                events.append(
                    ResponseEvent("response.function_call_arguments.delta", output_index=index, item_id=item_id, delta=call.arguments)
                )
        if piece.finish_reason is not None:
            self.finish_reason = piece.finish_reason
        return events

    def finish(self) -> list[ResponseEvent]:
        """Close the open item (incomplete if the response is); an output with no item gets an empty message."""
        status, _ = response_status(self.finish_reason)
        events = []
        if not self.items:
            events += self._add(OutputItem("message", new_item_id("msg"), "in_progress"))
        return events + self._close(status)


__all__ = [
    "OutputAssembler", "OutputItem", "ResponseEvent", "ResponseObject", "ResponseUsage", "new_item_id", "response_status",
]  # fmt: skip
