"""The pythonic tool-call format (Llama 3.2 and Llama 4 style): the whole answer is a Python list of calls
with keyword arguments, `[get_weather(city="Paris"), add(a=1, b=2)]`, optionally between Llama 4's
<|python_start|> and <|python_end|>.

Arguments are Python literals (JSON's true/false/null read too) and come back as JSON text. While
streaming, a call goes out whole (id, name and arguments in one piece) once its closing parenthesis
arrives; an answer that does not turn out to be such a list goes out as content.
"""

from __future__ import annotations

import ast
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from lmserve.api.tool_calls import FunctionTool, ToolCall, ToolEvent
from lmserve.engine.grammar import json_schema_lark

START, END = "<|python_start|>", "<|python_end|>"
_JSON_NAMES = {"true": True, "false": False, "null": None}
_WS = " \t\r\n"

SYSTEM_PROMPT = """You have access to the functions below. To call one or more of them, answer with nothing but a Python list of calls with keyword arguments: [func_name1(param_name1=value1, param_name2=value2), func_name2(param=value)]

{tools}"""


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
    return ast.literal_eval(node)


def parse_calls(text: str, names: frozenset[str]) -> list[tuple[str, str]] | None:
    """`[f(a=1), ...]` -> (name, JSON arguments) per call; None when it is not such a list of known tools."""
    try:
        tree = ast.parse(text.strip(_WS), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.List):
        return None
    out = []
    for node in tree.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names) or node.args:
            return None
        try:
            arguments = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
            out.append((node.func.id, json.dumps(arguments, ensure_ascii=False)))
        except (ValueError, TypeError, SyntaxError):
            return None
    return out


@dataclass(frozen=True)
class PythonicFormat:
    name: str = "pythonic"
    markers: tuple[str, ...] = (START,)

    def renders_tools(self, chat_template: str | None) -> bool:
        return bool(chat_template) and ("[func_name1(" in chat_template or START in chat_template)  # type: ignore[operator]

    def describe(self, tools: list[FunctionTool]) -> str:
        return SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools))

    def calls_text(self, calls: list[tuple[str, Any]]) -> str:
        def call(name: str, arguments: Any) -> str:  # values as JSON, as the grammar writes them
            items = arguments.items() if isinstance(arguments, dict) else ()
            return f"{name}({', '.join(f'{k}={json.dumps(v, ensure_ascii=False)}' for k, v in items)})"

        return "[" + ", ".join(call(n, a) for n, a in calls) + "]"

    def grammar(self, tools: list[FunctionTool], parallel: bool, special_ids: dict[str, int] | None = None) -> str:
        """Keyword arguments in the schema's order: the required ones, then optional ones in order (each
        value JSON for its schema, which Python reads too, JSON's true/false/null aside)."""
        rules = []
        for i, tool in enumerate(tools):
            props = (tool.parameters or {}).get("properties") or {}
            required = set((tool.parameters or {}).get("required") or ())
            for j, (key, schema) in enumerate(props.items()):
                rules.append(f"arg{i}_{j}: {json.dumps(key + '=')} value{i}_{j}\nvalue{i}_{j}: {json_schema_lark(schema)}")
            must = [f"arg{i}_{j}" for j, k in enumerate(props) if k in required]
            may = [f"arg{i}_{j}" for j, k in enumerate(props) if k not in required]
            if must:
                args = ' ", " '.join(must) + "".join(f' (", " {a})?' for a in may)
            elif may:
                nested = ""
                for a in reversed(may[1:]):
                    nested = f' (", " {a}{nested})?'
                args = f"({may[0]}{nested})?"
            else:
                args = ""
            rules.append(f"call{i}: {json.dumps(tool.name + '(')} {args} \")\"".replace("  ", " "))
        calls = " | ".join(f"call{i}" for i in range(len(tools)))
        repeat = ' (", " call)*' if parallel else ""
        return f'start: "[" call{repeat} "]"\ncall: {calls}\n' + "\n".join(rules) + "\n"

    def parser(self, tools: tuple[FunctionTool, ...]) -> PythonicParser:
        return PythonicParser(frozenset(t.name for t in tools))


@dataclass
class PythonicParser:
    names: frozenset[str]
    calls: list[ToolCall] = field(default_factory=list)
    _text: str = ""
    _mode: str = "start"  # start (only whitespace so far) | list | content
    _list_at: int = 0  # where the list begins in _text
    _scanned: int = 0  # how far the bracket scan has read
    _last_end: int = 0  # where the text after the last call sent begins
    _depth: int = 0
    _quote: str = ""  # the open string's quote
    _escaped: bool = False

    def feed(self, text: str) -> list[ToolEvent]:
        self._text += text
        events: list[ToolEvent] = []
        if self._mode == "start":
            body = self._text.lstrip(_WS)
            if body.startswith(START):
                body = body[len(START) :].lstrip(_WS)
            elif START.startswith(body) and body:
                return events
            if not body:
                return events
            if body[0] != "[":
                self._mode = "content"
                events.append(ToolEvent(content=self._text))
                return events
            self._mode, self._list_at = "list", len(self._text) - len(body)
            self._scanned = self._list_at
        if self._mode == "content":
            if text and (text.strip(_WS) or not self.calls):
                events.append(ToolEvent(content=text))
            return events
        self._scan(events)
        return events

    def finish(self) -> list[ToolEvent]:
        if self._mode == "list":  # the list never closed: whatever it was, it is content
            self._mode = "content"
            rest = self._text if not self.calls else self._text[self._last_end :]
            return [ToolEvent(content=rest)] if rest.strip(_WS) or not self.calls else []
        if self._mode == "start" and self._text:
            return [ToolEvent(content=self._text)]
        return []

    def _scan(self, events: list[ToolEvent]) -> None:
        text = self._text
        i = self._scanned
        while i < len(text):
            ch = text[i]
            i += 1
            if self._quote:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == self._quote:
                    self._quote = ""
                continue
            if ch in "\"'":
                self._quote = ch
            elif ch in "([{":
                self._depth += 1
            elif ch in ")]}":
                self._depth -= 1
                if self._depth == 1 and ch == ")":
                    if not self._emit(events, text[self._list_at : i] + "]"):
                        return self._give_up(events)
                    self._last_end = i
                elif self._depth == 0:
                    self._scanned = i
                    if not self._emit(events, text[self._list_at : i]):
                        return self._give_up(events)
                    self._mode = "content"
                    rest = text[i:].replace(END, "", 1)
                    if rest.strip(_WS):
                        events.append(ToolEvent(content=rest))
                    return None
        self._scanned = i
        return None

    def _emit(self, events: list[ToolEvent], list_text: str) -> bool:
        parsed = parse_calls(list_text, self.names)
        if parsed is None:
            return False
        for name, arguments in parsed[len(self.calls) :]:
            call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, arguments)
            events.append(ToolEvent(index=len(self.calls), id=call.id, name=name, arguments=arguments))
            self.calls.append(call)
        return True

    def _give_up(self, events: list[ToolEvent]) -> None:
        """Not a list of calls of known tools: all of it is content (calls already sent stay calls)."""
        self._mode = "content"
        events.append(ToolEvent(content=self._text if not self.calls else self._text[self._last_end :]))

