"""OpenAI function calling over the chat template's tool format.

    plan = plan_tools(tools, tool_choice, parallel_tool_calls, chat_template)   # validated; None: no tools
    messages, template_tools = plan.prompt(messages)       # what the chat template renders
    plan.constraint                                         # required / named: a grammar the output must follow
    parser = ToolStreamParser(plan)                         # per choice: text deltas -> content / tool-call events
    events = parser.feed(delta_text) ... + parser.finish()
    parse_output(plan, text)                                # the same, for a whole text

The format is Hermes's, which Qwen2/2.5/3 templates (and most fine-tunes) use natively:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A template that knows `<tool_call>` renders the tools itself. One that does not (SmolLM2's ignores `tools`)
gets them described in a system message in the same format, and earlier tool calls written into assistant
turns as such blocks. `required` and a named tool_choice constrain decoding to one or more such blocks whose
JSON validates against the tools' parameter schemas, so the arguments always parse.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from lmserve.api.errors import APIError
from lmserve.engine.grammar import json_schema_lark
from lmserve.types import ConstraintKind, FinishReason, StructuredOutput

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
MAX_TOOLS = 128
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The start of a call's JSON up to its arguments' value: name first, as the format (and the grammar) has it.
_HEAD_RE = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_DECODER = json.JSONDecoder()

SYSTEM_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


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

    def call_schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"name": {"const": self.name}, "arguments": self.parameters or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(frozen=True)
class ToolPlan:
    tools: tuple[FunctionTool, ...]
    choice: str  # none | auto | required | named
    named: str | None = None
    parallel: bool = True
    native: bool = False  # the chat template renders `tools` and knows <tool_call>

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    @property
    def constraint(self) -> StructuredOutput | None:
        """required / named: the output must be tool-call blocks for these tools."""
        if self.choice not in ("required", "named"):
            return None
        tools = [t for t in self.tools if self.choice == "required" or t.name == self.named]
        schema = tools[0].call_schema() if len(tools) == 1 else {"anyOf": [t.call_schema() for t in tools]}
        repeat = ' ("\\n" call)*' if self.choice == "required" and self.parallel else ""
        lark = f'start: call{repeat}\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: {json_schema_lark(schema)}\n'
        return StructuredOutput(ConstraintKind.GRAMMAR, lark, param="tools")

    def prompt(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages and `tools` for the chat template."""
        if self.choice == "none":
            return messages, None
        if self.native:
            return messages, [t.as_openai() for t in self.tools]
        described = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in self.tools)
        system = SYSTEM_PROMPT.format(tools=described)
        out = [_with_calls_as_text(m) for m in messages]
        if out and out[0].get("role") in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{system}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": system})
        return out, None

    def finish_reason(self, called: bool, reason: FinishReason | None) -> str | None:
        """OpenAI's: "tool_calls" when auto or required called tools and stopped; "stop" for a named call."""
        if reason is None:
            return None
        if called and reason == FinishReason.STOP and self.choice in ("auto", "required"):
            return "tool_calls"
        return reason.value


def _with_calls_as_text(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if message.get("role") != "assistant" or not calls:
        return message
    blocks = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        blocks.append(f"{OPEN}\n{json.dumps({'name': function.get('name'), 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}")
    content = message.get("content") or ""
    rest = {k: v for k, v in message.items() if k != "tool_calls"}
    return {**rest, "content": "\n".join(([content] if content else []) + blocks)}


def plan_tools(
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
    chat_template: str | None,
) -> ToolPlan | None:
    """Validate `tools` and `tool_choice` (OpenAI's shapes); None when the request has no tools."""
    if tool_choice is not None and not tools and tool_choice not in ("none", "auto"):
        raise APIError("tool_choice requires tools.", "invalid_value", "tool_choice")
    if not tools:
        return None
    if len(tools) > MAX_TOOLS:
        raise APIError(f"At most {MAX_TOOLS} tools are allowed.", "invalid_value", "tools")
    parsed: list[FunctionTool] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
            raise APIError("Each tool must be {'type': 'function', 'function': {...}}.", "invalid_value", f"tools[{i}]")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise APIError(
                "A function name must be 1-64 letters, digits, underscores or dashes.", "invalid_value", f"tools[{i}].function.name"
            )
        if any(t.name == name for t in parsed):
            raise APIError(f"Two tools are named '{name}'.", "invalid_value", f"tools[{i}].function.name")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise APIError("parameters must be a JSON schema object.", "invalid_value", f"tools[{i}].function.parameters")
        description = function.get("description")
        parsed.append(FunctionTool(name, description if isinstance(description, str) else None, parameters))
    choice, named = _tool_choice(tool_choice, parsed)
    native = bool(chat_template) and OPEN in (chat_template or "")
    return ToolPlan(tuple(parsed), choice, named, parallel_tool_calls is not False, native)


def _tool_choice(tool_choice: Any, tools: list[FunctionTool]) -> tuple[str, str | None]:
    if tool_choice is None:
        return "auto", None
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if not any(t.name == name for t in tools):
            raise APIError(f"tool_choice names '{name}', which is not among the tools.", "invalid_value", "tool_choice")
        return "named", name
    raise APIError(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}.",
        "invalid_value",
        "tool_choice",
    )


# -- parsing the output ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolEvent:
    """One piece of a choice's output: content text, or a tool call's start (id and name) or arguments."""

    content: str | None = None
    index: int = 0  # the tool call's position among this choice's calls
    id: str | None = None  # set on a call's first event, with its name
    name: str | None = None
    arguments: str | None = None


@dataclass
class ToolStreamParser:
    """Splits one choice's text, as it streams, into content and tool calls (OpenAI's delta shape).

    Content is passed on at once except a tail that could begin `<tool_call>`; a call's name goes out as
    soon as its JSON has it, and its arguments as they arrive, held back only from their last `}` (which may
    close the call instead). A block that turns out not to be a call of a known tool goes out as content.
    """

    plan: ToolPlan
    calls: list[ToolCall] = field(default_factory=list)
    _buffer: str = ""
    _in_call: bool = False
    _head_end: int | None = None  # where the current call's arguments start in _buffer
    _call_id: str = ""
    _call_name: str = ""
    _num_args_sent: int = 0

    def feed(self, text: str) -> list[ToolEvent]:
        self._buffer += text
        events: list[ToolEvent] = []
        while True:
            if not self._in_call:
                at = self._buffer.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self._buffer, OPEN)
                    self._content(events, self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return events
                self._content(events, self._buffer[:at])
                self._buffer = self._buffer[at + len(OPEN) :]
                self._in_call, self._head_end, self._num_args_sent = True, None, 0
            end = self._buffer.find(CLOSE)
            body = self._buffer if end < 0 else self._buffer[:end]
            if self._head_end is None:
                self._start_call(events, body)
            if end < 0:
                if self._head_end is not None:
                    args = body[self._head_end :]
                    self._send_args(events, args[: max(args.rfind("}"), 0)])
                return events
            self._end_call(events, body)
            self._buffer = self._buffer[end + len(CLOSE) :].lstrip("\n")
            self._in_call = False

    def finish(self) -> list[ToolEvent]:
        """The rest at the end of the output (a call cut off by max_tokens keeps what it has)."""
        events: list[ToolEvent] = []
        if self._in_call:
            if self._head_end is not None:
                self._send_args(events, self._buffer[self._head_end :])
                self._record_call(self._buffer[self._head_end :])
            else:
                self._content(events, OPEN + self._buffer)
        else:
            self._content(events, self._buffer)
        self._buffer, self._in_call = "", False
        return events

    def _content(self, events: list[ToolEvent], text: str) -> None:
        if not text:
            return
        if self.calls or self._in_call:
            if not text.strip():
                return  # the newlines between calls
        events.append(ToolEvent(content=text))

    def _known(self, name: str) -> bool:
        return any(t.name == name for t in self.plan.tools)

    def _start_call(self, events: list[ToolEvent], body: str) -> None:
        match = _HEAD_RE.match(body)
        if match is None:
            return
        try:
            name = json.loads(f'"{match.group(1)}"')
        except ValueError:
            return
        if not self._known(name):
            return
        self._head_end, self._call_id, self._call_name = match.end(), f"call_{uuid.uuid4().hex[:24]}", name
        events.append(ToolEvent(index=len(self.calls), id=self._call_id, name=name, arguments=""))

    def _send_args(self, events: list[ToolEvent], args: str) -> None:
        if len(args) > self._num_args_sent:
            events.append(ToolEvent(index=len(self.calls), arguments=args[self._num_args_sent :]))
            self._num_args_sent = len(args)

    def _end_call(self, events: list[ToolEvent], body: str) -> None:
        if self._head_end is not None:
            rest = body[self._head_end :]
            try:
                _, end = _DECODER.raw_decode(rest)
                args = rest[:end]
            except ValueError:
                args = rest.rstrip().removesuffix("}").rstrip()
            self._send_args(events, args)
            self._record_call(args)
            return
        # Not name-first (an unconstrained model may order the keys otherwise): parse the whole block.
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and self._known(obj["name"]):
            arguments = obj.get("arguments", {})
            text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            self._call_id, self._call_name = f"call_{uuid.uuid4().hex[:24]}", obj["name"]
            events.append(ToolEvent(index=len(self.calls), id=self._call_id, name=self._call_name, arguments=text))
            self._record_call(text)
        else:
            self._in_call = False
            self._content(events, f"{OPEN}{body}{CLOSE}")

    def _record_call(self, args: str) -> None:
        self.calls.append(ToolCall(self._call_id, self._call_name, args))
        self._head_end = None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


def parse_output(plan: ToolPlan, text: str) -> ParsedOutput:
    """A whole choice's text -> its content (None when it only called tools) and tool calls."""
    parser = ToolStreamParser(plan)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.content for e in events if e.content is not None)
    if parser.calls:
        content = content.strip()
    return ParsedOutput(content or (None if parser.calls else ""), parser.calls)
