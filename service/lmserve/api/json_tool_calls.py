"""Tool-call formats whose calls are JSON objects `{"name": ..., "arguments": {...}}`, and their one
streaming parser. Three formats differ only in the text around the objects and the arguments' key:

    hermes       <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>    (Qwen2.5/3, Hermes, most fine-tunes)
    llama3_json  {"name": "f", "parameters": {...}}; {...}   after <|python_tag|> or opening the output
    mistral      [TOOL_CALLS][{"name": "f", "arguments": {...}}, {...}]

Text before the first marker is content. From a marker on, the parser reads calls; text that cannot be a
call of a known tool goes out as content (with its marker when no call came before it). A call's name goes
out as soon as its JSON has it, its arguments as they arrive, held back only from their last `}` until the
JSON value is complete; the streamed arguments add up to the whole text's, byte for byte.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from lmserve.api.tool_calls import FunctionTool, ToolCall, ToolEvent, json_calls_lark, partial_suffix

_DECODER = json.JSONDecoder()
_WS = " \t\r\n"


@dataclass(frozen=True)
class JsonCallFormat:
    name: str
    markers: tuple[str, ...]  # text that opens the calls
    template_signs: tuple[str, ...]  # text in a chat template that writes `tools` in this format
    system_prompt: str  # describes the tools where the template does not ({tools}: one JSON line each)
    prefix: str = ""  # written before the calls (by the grammar and for past calls)
    call_open: str = ""
    call_close: str = ""
    joiner: str = "\n"
    suffix: str = ""
    arguments_key: str = "arguments"
    other_arguments_keys: tuple[str, ...] = ()  # also read (Llama 3 models write either)
    bare_start: bool = False  # a call may open the output with no marker
    more_separators: tuple[str, ...] = ()  # besides those the text around the calls has

    def renders_tools(self, chat_template: str | None) -> bool:
        return bool(chat_template) and any(sign in chat_template for sign in self.template_signs)  # type: ignore[operator]

    def describe(self, tools: list[FunctionTool]) -> str:
        return self.system_prompt.format(tools="\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools))

    def calls_text(self, calls: list[tuple[str, Any]]) -> str:
        objs = [json.dumps({"name": n, self.arguments_key: a}, ensure_ascii=False) for n, a in calls]
        return self.prefix + self.joiner.join(f"{self.call_open}{o}{self.call_close}" for o in objs) + self.suffix

    def grammar(self, tools: list[FunctionTool], parallel: bool, special_ids: dict[str, int] | None = None) -> str:
        def lit(text: str) -> list[str]:  # Lark for literal text, markers that are special tokens as those
            out: list[str] = []
            for part in re.split("(" + "|".join(re.escape(m) for m in special_ids or {}) + ")", text) if special_ids else [text]:
                if part in (special_ids or {}):
                    out.append(f"<[{special_ids[part]}]>")  # type: ignore[index]
                elif part:
                    out.append(json.dumps(part))
            return out

        repeat = f" ({' '.join(lit(self.joiner))} call)*" if parallel else ""
        call = " ".join([*lit(self.call_open), "body", *lit(self.call_close)])
        start = " ".join([*lit(self.prefix), "call" + repeat, *lit(self.suffix)])
        return f"start: {start}\ncall: {call}\nbody: {json_calls_lark(tools, self.arguments_key)}\n"

    def parser(self, tools: tuple[FunctionTool, ...]) -> JsonCallParser:
        return JsonCallParser(self, frozenset(t.name for t in tools))

    @property
    def separators(self) -> tuple[str, ...]:
        """Text allowed around and between calls besides whitespace."""
        pieces = [p.strip(_WS) for p in (self.prefix, self.call_open, self.call_close, self.joiner, self.suffix)]
        return tuple(dict.fromkeys(p for p in (*self.markers, *pieces, *self.more_separators) if p))

    def head_re(self) -> re.Pattern[str]:
        keys = "|".join(re.escape(k) for k in (self.arguments_key, *self.other_arguments_keys))
        return re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:' + keys + r')"\s*:\s*(?=\S)')


@dataclass
class _Partial:
    name: str
    arguments: str
    is_complete: bool


@dataclass
class _Scan:
    calls: list[_Partial]
    broken_at: int | None  # where text that cannot be a call begins


@dataclass
class JsonCallParser:
    fmt: JsonCallFormat
    names: frozenset[str]
    calls: list[ToolCall] = field(default_factory=list)
    _pending: str = ""  # content not yet sent (a tail that may begin a marker)
    _in_calls: bool = False
    _marker: str = ""  # the marker that opened the current calls ("" for a bare start)
    _region: str = ""  # the text after it
    _ids: list[str] = field(default_factory=list)  # the current region's calls' ids, as they start
    _num_sent: list[int] = field(default_factory=list)  # argument characters sent per call
    _at_start: bool = True  # nothing but whitespace so far (a bare start may still come)

    def feed(self, text: str) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        if self._in_calls:
            self._region += text
            self._read_calls(events, final=False)
        else:
            self._pending += text
            self._read_content(events)
        return events

    def finish(self) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        while self._in_calls:  # each read closes the calls (what follows them may open more)
            self._read_calls(events, final=True)
        self._content(events, self._pending)
        self._pending = ""
        return events

    # -- content, until a marker --------------------------------------------------------------------------

    def _read_content(self, events: list[ToolEvent]) -> None:
        while not self._in_calls:
            text = self._pending
            if self._at_start and self.fmt.bare_start:
                stripped = text.lstrip(_WS)
                if not stripped:
                    return  # only whitespace so far: a call may still open the output
                self._at_start = False
                if stripped.startswith("{"):
                    self._pending = ""
                    self._open("", stripped, events)
                    return
            self._at_start = self._at_start and not text.strip(_WS)
            found = [(text.find(m), m) for m in self.fmt.markers if m in text]
            if not found:
                keep = max((partial_suffix(text, m) for m in self.fmt.markers), default=0)
                self._content(events, text[: len(text) - keep])
                self._pending = text[len(text) - keep :]
                return
            at, marker = min(found)
            self._content(events, text[:at])
            self._pending = ""
            self._open(marker, text[at + len(marker) :], events)

    def _open(self, marker: str, region: str, events: list[ToolEvent]) -> None:
        self._in_calls, self._marker, self._region, self._ids, self._num_sent = True, marker, region, [], []
        self._read_calls(events, final=False)

    def _content(self, events: list[ToolEvent], text: str) -> None:
        if text and (text.strip(_WS) or not self.calls):
            events.append(ToolEvent(content=text))

    # -- calls ------------------------------------------------------------------------------------------

    def _read_calls(self, events: list[ToolEvent], final: bool) -> None:
        scan = self._scan(self._region, final)
        base = len(self.calls)
        for k, call in enumerate(scan.calls):
            if k == len(self._ids):
                self._ids.append(f"call_{uuid.uuid4().hex[:24]}")
                self._num_sent.append(0)
                events.append(ToolEvent(index=base + k, id=self._ids[k], name=call.name, arguments=""))
            if len(call.arguments) > self._num_sent[k]:
                events.append(ToolEvent(index=base + k, arguments=call.arguments[self._num_sent[k] :]))
                self._num_sent[k] = len(call.arguments)
        if scan.broken_at is None and not final:
            return
        done = [c for c in scan.calls if c.is_complete or final]
        self.calls += [ToolCall(self._ids[k], c.name, c.arguments) for k, c in enumerate(done)]
        rest = self._region[scan.broken_at :] if scan.broken_at is not None else ""
        if not done:
            rest = self._marker + self._region
        self._in_calls, self._region = False, ""
        if not rest:
            return
        # What follows may hold a marker again (not the one just given up on, which stays content).
        skip = len(self._marker) if not done else 0
        later = [(rest.find(m, skip), m) for m in self.fmt.markers if rest.find(m, skip) >= 0]
        at = min(later)[0] if later else len(rest)
        self._content(events, rest[:at])
        self._pending = rest[at:]
        self._read_content(events)

    def _scan(self, text: str, final: bool) -> _Scan:
        calls: list[_Partial] = []
        head_re = self.fmt.head_re()
        pos = 0
        while True:
            pos = self._skip_separators(text, pos, final)
            if pos is None or pos >= len(text):
                return _Scan(calls, None)
            if text[pos] != "{":
                return _Scan(calls, pos)
            head = head_re.match(text, pos)
            if head is None:
                whole = self._whole_object(text, pos)
                if whole is None:  # not JSON yet: it may still become a call
                    return _Scan(calls, pos if final else None)
                call, end = whole
                if call is None:
                    return _Scan(calls, pos)
                calls.append(call)
                pos = end
                continue
            try:
                name = json.loads(f'"{head.group(1)}"')
            except ValueError:
                return _Scan(calls, pos)
            if name not in self.names:
                return _Scan(calls, pos)
            call, end = self._arguments(text, pos, head.end(), name, final)
            calls.append(call)
            if end is None:
                return _Scan(calls, None)
            pos = end

    def _skip_separators(self, text: str, pos: int, final: bool) -> int | None:
        """The next position past whitespace and separators; None while what is left may begin one."""
        while pos < len(text):
            if text[pos] in _WS:
                pos += 1
                continue
            sep = next((s for s in self.fmt.separators if text.startswith(s, pos)), None)
            if sep is not None:
                pos += len(sep)
                continue
            if not final and any(s.startswith(text[pos:]) for s in self.fmt.separators):
                return None
            return pos
        return pos

    def _arguments(self, text: str, start: int, args_at: int, name: str, final: bool) -> tuple[_Partial, int | None]:
        """A call whose head is read: its arguments so far, and where the text after it begins (None: not yet)."""
        close = self.fmt.call_close.strip(_WS)
        bound = text.find(close, args_at) if close else -1
        try:
            value, args_end = _DECODER.raw_decode(text, args_at)
        except ValueError:
            value, args_end = None, -1
        if isinstance(value, dict) and (bound < 0 or args_end <= bound):
            args = text[args_at:args_end]
            after = args_end
            while after < len(text) and text[after] in _WS:
                after += 1
            if after < len(text) and text[after] == "}":
                return _Partial(name, args, True), after + 1
            if after < len(text):  # more keys after the arguments (Mistral's "id"): the object whole
                whole = _DECODER.raw_decode(text, start) if self._decodes(text, start) else None
                if whole is not None:
                    return _Partial(name, args, True), whole[1]
            return _Partial(name, args, final), None if not final else len(text)
        if bound >= 0:  # malformed, and closed: what came before its last brace
            body = text[args_at:bound]
            return _Partial(name, body[: max(body.rfind("}"), 0)], True), bound + len(close)
        rest = text[args_at:]
        if final:  # cut off (max_tokens): what it has
            return _Partial(name, rest.rstrip(_WS), True), len(text)
        return _Partial(name, rest[: max(rest.rfind("}"), 0)], False), None

    @staticmethod
    def _decodes(text: str, pos: int) -> bool:
        try:
            _DECODER.raw_decode(text, pos)
        except ValueError:
            return False
        return True

    def _whole_object(self, text: str, pos: int) -> tuple[_Partial | None, int] | None:
        """A call whose keys come in another order, read once its object is whole; (None, end) when the
        object is no call of a known tool; None while it is not whole yet."""
        try:
            obj, end = _DECODER.raw_decode(text, pos)
        except ValueError:
            return None
        keys = (self.fmt.arguments_key, *self.fmt.other_arguments_keys)
        if not isinstance(obj, dict) or obj.get("name") not in self.names:
            return None, end
        arguments = next((obj[k] for k in keys if k in obj), {})
        args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return _Partial(obj["name"], args, True), end


HERMES = JsonCallFormat(
    name="hermes",
    markers=("<tool_call>",),
    template_signs=("<tool_call>",),
    system_prompt="""# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>""",
    call_open="<tool_call>\n",
    call_close="\n</tool_call>",
    joiner="\n",
)

LLAMA3_JSON = JsonCallFormat(
    name="llama3_json",
    markers=("<|python_tag|>",),
    template_signs=("<|python_tag|>", '"parameters": dictionary of argument name'),
    system_prompt="""Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.

Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. Do not use variables.

{tools}""",
    joiner="; ",
    arguments_key="parameters",
    other_arguments_keys=("arguments",),
    bare_start=True,
)

MISTRAL = JsonCallFormat(
    name="mistral",
    markers=("[TOOL_CALLS]",),
    template_signs=("[TOOL_CALLS]",),
    system_prompt="""[AVAILABLE_TOOLS]
{tools}
[/AVAILABLE_TOOLS]

To call functions, answer with [TOOL_CALLS] and a JSON list of {{"name": <function-name>, "arguments": <args-json-object>}}.""",
    prefix="[TOOL_CALLS][",
    joiner=", ",
    suffix="]",
    more_separators=("[",),
)
