"""What every tool-call format shares: the tools a request declares, the calls parsed out of a choice's text,
the events a streaming parser yields, and the interface a format implements (api/tool_formats.py lists
the formats; api/tools.py plans a request's tools over one of them).

A format is one object with three jobs:

    fmt.renders_tools(chat_template)          # the template writes `tools` itself in this format
    fmt.describe(tools) / fmt.calls_text(calls)  # otherwise: a system message, and past calls as text
    fmt.parser(tools)                         # a streaming parser: text deltas -> content / call events
    fmt.grammar(tools, parallel, special_ids)  # Lark for required / named: output that is only calls
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from lmserve.engine.grammar import json_schema_lark


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str | None
    parameters: dict[str, Any] | None

    def as_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}

    def call_schema(self, arguments_key: str = "arguments") -> dict[str, Any]:
        """The JSON schema of a call written as `{"name": ..., arguments_key: {...}}`, name first."""
        return {
            "type": "object",
            "properties": {"name": {"const": self.name}, arguments_key: self.parameters or {"type": "object"}},
            "required": ["name", arguments_key],
            "additionalProperties": False,
        }


def json_calls_lark(tools: list[FunctionTool], arguments_key: str = "arguments") -> str:
    """A Lark fragment for one call of any of `tools` as a JSON object (name first)."""
    schemas = [t.call_schema(arguments_key) for t in tools]
    return json_schema_lark(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text: as the model wrote it where it wrote JSON


@dataclass(frozen=True)
class ToolEvent:
    """One piece of a choice's output: content text, or a tool call's start (id and name) or arguments."""

    content: str | None = None
    index: int = 0  # the tool call's position among this choice's calls
    id: str | None = None  # set on a call's first event, with its name
    name: str | None = None
    arguments: str | None = None


class CallStreamParser(Protocol):
    """One choice's text, as it streams -> content and tool-call events. The arguments a call's events
    carry add up to that call's `arguments` in `calls`; a whole text fed at once gives the same calls."""

    calls: list[ToolCall]

    def feed(self, text: str) -> list[ToolEvent]: ...

    def finish(self) -> list[ToolEvent]: ...


class ToolFormat(Protocol):
    name: str  # --tool-call-parser's value (vLLM's names)
    markers: tuple[str, ...]  # text that starts calls; a tokenizer may hold these as special tokens

    def renders_tools(self, chat_template: str | None) -> bool: ...

    def describe(self, tools: list[FunctionTool]) -> str: ...

    def calls_text(self, calls: list[tuple[str, Any]]) -> str: ...

    def parser(self, tools: tuple[FunctionTool, ...]) -> CallStreamParser: ...

    def grammar(self, tools: list[FunctionTool], parallel: bool, special_ids: dict[str, int]) -> str:
        """`special_ids`: markers the tokenizer holds as special tokens, written as those tokens."""
        ...


def history_calls(message: dict[str, Any]) -> list[tuple[str, Any]]:
    """An assistant message's tool_calls as (name, arguments) with JSON-text arguments decoded."""
    out = []
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        out.append((function.get("name"), arguments))
    return out


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
