"""Reasoning parsers: the thinking a model writes between <think> and </think> before its answer, apart
from the answer (chat's `reasoning_content`), whole or as it streams.

    fmt = reasoning_format(parser_name, chat_template)    # --reasoning-parser, else the template's; None: off
    plan = ReasoningPlan.for_prompt(fmt, prompt_tail)     # where the rendered prompt leaves the output
    parser = plan.parser()                                # per choice: text -> (reasoning, content) pieces
    plan.constrain(structured)                            # an answer's constraint, after the thinking

Where the output begins is read from the rendered prompt, so chat_template_kwargs such as Qwen3's
`enable_thinking: false` (whose template writes an empty `<think>\\n\\n</think>` into the prompt) need
nothing of their own: a prompt that opened a think block and left it open (DeepSeek-R1's, Qwen3 thinking
models') starts the output inside the thinking; one that closed it leaves the whole output as content;
otherwise the output may open with <think>. The two parsers differ only there: deepseek_r1 reads output
that does not open with <think> as thinking until </think> (R1 always thinks), qwen3 as content.

Thinking is only read at the start of the output; its leading and trailing whitespace and the whitespace
after </think> are dropped. Output cut off inside the thinking is all reasoning, streamed or not.
Structured outputs and forced tool calls constrain the answer after the thinking: the constraint becomes
a grammar that first lets the model think (where a think block must or may come) and then holds the
answer to the constraint. A `grammar` constraint (Lark or GBNF) is the client's own and applies to the
whole output, thinking included.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from lmserve.api.tool_calls import partial_suffix
from lmserve.engine.grammar import json_schema_lark
from lmserve.types import ConstraintKind, StructuredOutput

START, END = "<think>", "</think>"
_WS = " \t\r\n"


@dataclass(frozen=True)
class ReasoningFormat:
    name: str  # --reasoning-parser's value (vLLM's names)
    thinks_unopened: bool  # output that does not open with <think> is thinking until </think>
    template_signs: tuple[str, ...]  # all of them in a chat template: the template's parser

    def matches(self, chat_template: str | None) -> bool:
        return bool(chat_template) and all(s in chat_template for s in self.template_signs)  # type: ignore[operator]


DEEPSEEK_R1 = ReasoningFormat("deepseek_r1", True, (START, "<｜Assistant｜>"))
QWEN3 = ReasoningFormat("qwen3", False, (START,))
# In detection order: DeepSeek's templates also write <think>.
REASONING_FORMATS = {f.name: f for f in (DEEPSEEK_R1, QWEN3)}
REASONING_PARSERS = tuple(REASONING_FORMATS)


def reasoning_format(parser_name: str | None, chat_template: str | None) -> ReasoningFormat | None:
    if parser_name is not None:
        return REASONING_FORMATS[parser_name]
    return next((f for f in REASONING_FORMATS.values() if f.matches(chat_template)), None)


@dataclass(frozen=True)
class ReasoningPlan:
    fmt: ReasoningFormat
    start: str  # inside (the prompt opened a think block) | closed (it closed one) | open (output may think)

    @classmethod
    def for_prompt(cls, fmt: ReasoningFormat, prompt_tail: str) -> ReasoningPlan:
        """`prompt_tail`: the end of the rendered prompt (its generation prompt and after), as text."""
        opened, closed = prompt_tail.rfind(START), prompt_tail.rfind(END)
        if opened > closed:
            return cls(fmt, "inside")
        if closed >= 0 and not prompt_tail[closed + len(END) :].strip(_WS):
            return cls(fmt, "closed")
        return cls(fmt, "open")

    @property
    def has_reasoning(self) -> bool:
        return self.start != "closed"

    def parser(self) -> ReasoningParser:
        if self.start == "inside" or (self.start == "open" and self.fmt.thinks_unopened):
            return ReasoningParser("reasoning", may_open=self.start == "open")
        return ReasoningParser("maybe" if self.start == "open" else "content")

    def constrain(self, structured: StructuredOutput) -> StructuredOutput:
        """The constraint on the answer, after the thinking: which must end first where the prompt opened
        it, and may come first where the prompt leaves it open (a model that thinks will; one that does
        not, though its template mentions <think>, is not made to)."""
        answer = _answer_lark(structured)
        if answer is None or self.start == "closed":
            return structured
        think = 'think[stop="</think>"]: /(?s:.*)/\n'
        head = "think THINK_GAP" if self.start == "inside" else f"({json.dumps(START)} think THINK_GAP)?"
        grammar = f"start: {head} answer\n{think}THINK_GAP: /\\n{{0,2}}/\n{answer}"
        return StructuredOutput(ConstraintKind.GRAMMAR, grammar, param=structured.param)


def _answer_lark(structured: StructuredOutput) -> str | None:
    """Lark with an `answer` rule for the constraint; None for a client's own grammar."""
    kind, spec = structured.kind, structured.spec
    if kind == ConstraintKind.JSON_OBJECT:
        return f"answer: {json_schema_lark({'type': 'object'})}\n"
    if kind == ConstraintKind.JSON_SCHEMA:
        return f"answer: {json_schema_lark(json.loads(spec))}\n"
    if kind == ConstraintKind.REGEX:
        return f"answer: /{_lark_regex(spec)}/\n"
    if kind == ConstraintKind.CHOICE:
        return "answer: " + " | ".join(json.dumps(c) for c in json.loads(spec)) + "\n"
    if kind == ConstraintKind.GRAMMAR and structured.param == "tools":  # ours: a format's calls
        return re.sub(r"^start:", "answer:", spec, count=1, flags=re.M)
    return None


def _lark_regex(pattern: str) -> str:
    """The pattern with each `/` that no backslash escapes escaped (it would end a Lark regex)."""
    out, escaped = [], False
    for ch in pattern:
        out.append("\\/" if ch == "/" and not escaped else ch)
        escaped = ch == "\\" and not escaped
    return "".join(out)


@dataclass(frozen=True)
class ReasoningPiece:
    reasoning: str
    content: str


@dataclass
class ReasoningParser:
    """One choice's text -> its thinking and its answer, as it streams."""

    mode: str  # maybe (output may open with <think>) | reasoning | after (</think> seen) | content
    may_open: bool = False  # in reasoning from the start, yet a leading <think> is the model's own
    _buffer: str = ""
    _started: bool = False  # reasoning text has begun (its leading whitespace is dropped before that)

    def feed(self, text: str) -> ReasoningPiece:
        self._buffer += text
        reasoning, content = [], []
        while self._buffer:
            if self.mode == "maybe" or self.may_open:
                head = self._buffer.lstrip(_WS)
                if head.startswith(START):
                    self._buffer, self.mode, self.may_open = head[len(START) :], "reasoning", False
                    continue
                if START.startswith(head):
                    break  # may still open
                self.may_open = False
                if self.mode == "maybe":
                    self.mode = "content"
                continue
            if self.mode == "reasoning":
                at = self._buffer.find(END)
                if at >= 0:
                    reasoning.append(self._thinking(self._buffer[:at].rstrip(_WS)))
                    self._buffer, self.mode = self._buffer[at + len(END) :], "after"
                    continue
                keep = partial_suffix(self._buffer, END)
                text_part = self._buffer[: len(self._buffer) - keep]
                held = len(text_part) - len(text_part.rstrip(_WS))  # trailing whitespace: maybe before </think>
                reasoning.append(self._thinking(text_part[: len(text_part) - held]))
                self._buffer = self._buffer[len(text_part) - held :]
                break
            if self.mode == "after":
                self._buffer = self._buffer.lstrip(_WS)
                if self._buffer:
                    self.mode = "content"
                continue
            content.append(self._buffer)
            self._buffer = ""
        return ReasoningPiece("".join(reasoning), "".join(content))

    def finish(self) -> ReasoningPiece:
        rest, self._buffer = self._buffer, ""
        if self.mode == "reasoning" and not self.may_open:
            return ReasoningPiece(self._thinking(rest.rstrip(_WS)), "")
        if self.mode == "after":
            return ReasoningPiece("", "")
        if self.may_open:  # only a beginning of <think> came, inside the thinking
            return ReasoningPiece(self._thinking(rest.rstrip(_WS)), "")
        return ReasoningPiece("", rest)

    def _thinking(self, text: str) -> str:
        if not self._started:
            text = text.lstrip(_WS)
            self._started = bool(text)
        return text


def reasoning_token_count(token_ids: list[int], decode: Callable[[list[int]], str]) -> int:
    """Of a choice that thought, how many output tokens are its thinking: those through the one whose text
    completes </think>, or all of them where the thinking never ended. `decode`: token ids -> text with
    special tokens kept. A binary search over prefixes (a prefix holding </think> stays so when it grows)."""
    if END not in decode(token_ids):
        return len(token_ids)
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if END in decode(token_ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo
