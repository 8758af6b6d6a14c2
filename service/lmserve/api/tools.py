"""OpenAI function calling over one tool-call format (api/tool_formats.py: Hermes, Llama 3 JSON, Mistral,
pythonic).

    plan = plan_tools(tools, tool_choice, parallel_tool_calls, chat_template, parser_name)  # None: no tools
    messages, template_tools = plan.prompt(messages)       # what the chat template renders
    plan.constraint                                         # required / named: a grammar the output must follow
    parser = plan.parser()                                  # per choice: text deltas -> content / tool-call events
    events = parser.feed(delta_text) ... + parser.finish()
    parse_output(plan, text)                                # the same, for a whole text

The format is --tool-call-parser's, else the one the chat template writes (Qwen's `<tool_call>` is
Hermes's), else Hermes. A template that renders the format's tools itself gets `tools`; one that does not
(SmolLM2's ignores them) gets them described in a system message in the format, and earlier tool calls
written into assistant turns as such text. `required` and a named tool_choice constrain decoding to calls in
the format whose arguments validate against the tools' parameter schemas, so they always parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lmserve.api.errors import APIError
from lmserve.api.tool_calls import CallStreamParser, FunctionTool, ToolCall, ToolFormat, history_calls
from lmserve.api.tool_formats import HERMES, tool_format
from lmserve.types import ConstraintKind, FinishReason, StructuredOutput

MAX_TOOLS = 128
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ToolPlan:
    tools: tuple[FunctionTool, ...]
    choice: str  # none | auto | required | named
    named: str | None = None
    parallel: bool = True
    native: bool = False  # the chat template renders `tools` in the format itself
    format: ToolFormat = field(default=HERMES)
    # Special tokens' text that decoding keeps only so the format's marker (a special token of this
    # tokenizer) reaches the parser: removed from the output again before anything reads it.
    hidden_specials: tuple[str, ...] = ()
    marker_ids: tuple[tuple[str, int], ...] = ()  # markers the tokenizer holds as special tokens: their ids

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    @property
    def constraint_grammar(self) -> str | None:
        """required / named: Lark for output that is only calls of these tools, in the format."""
        if self.choice not in ("required", "named"):
            return None
        tools = [t for t in self.tools if self.choice == "required" or t.name == self.named]
        return self.format.grammar(tools, self.choice == "required" and self.parallel, dict(self.marker_ids))

    @property
    def constraint(self) -> StructuredOutput | None:
        grammar = self.constraint_grammar
        return None if grammar is None else StructuredOutput(ConstraintKind.GRAMMAR, grammar, param="tools")

    def parser(self) -> CallStreamParser:
        return self.format.parser(self.tools)

    def visible(self, text: str) -> str:
        """The output text without hidden_specials (a special token's text comes whole in one delta)."""
        for special in self.hidden_specials:
            text = text.replace(special, "")
        return text

    def prompt(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages and `tools` for the chat template."""
        if self.choice == "none":
            return messages, None
        if self.native:
            return messages, [t.as_openai() for t in self.tools]
        system = self.format.describe(list(self.tools))
        out = [self._with_calls_as_text(m) for m in messages]
        if out and out[0].get("role") in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{system}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": system})
        return out, None

    def _with_calls_as_text(self, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("role") != "assistant" or not message.get("tool_calls"):
            return message
        content = message.get("content") or ""
        rest = {k: v for k, v in message.items() if k != "tool_calls"}
        calls = self.format.calls_text(history_calls(message))
        return {**rest, "content": "\n".join(([content] if content else []) + [calls])}

    def finish_reason(self, called: bool, reason: FinishReason | None) -> str | None:
        """OpenAI's: "tool_calls" when auto or required called tools and stopped; "stop" for a named call."""
        if reason is None:
            return None
        if called and reason == FinishReason.STOP and self.choice in ("auto", "required"):
            return "tool_calls"
        return reason.value


def plan_tools(
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
    chat_template: str | None,
    parser_name: str | None = None,
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
    fmt = tool_format(parser_name, chat_template)
    return ToolPlan(tuple(parsed), choice, named, parallel_tool_calls is not False, fmt.renders_tools(chat_template), fmt)


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
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


def parse_output(plan: ToolPlan, text: str) -> ParsedOutput:
    """A whole choice's text -> its content (None when it only called tools) and tool calls."""
    parser = plan.parser()
    events = parser.feed(text) + parser.finish()
    content = "".join(e.content for e in events if e.content is not None)
    if parser.calls:
        content = content.strip()
    return ParsedOutput(content or (None if parser.calls else ""), parser.calls)
