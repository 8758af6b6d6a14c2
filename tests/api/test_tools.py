"""The tool-call format on its own: planning, the constraint's grammar, and parsing whole or streamed text."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve.api.errors import APIError
from lmserve.api.tools import ToolPlan, parse_output, plan_tools
from lmserve.engine.grammar import GrammarCompiler, grammar_text
from lmserve.types import ConstraintKind
from tests.api.chat_formats import streamed_calls

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add"}},
]
TEXT = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ris", "x": {"y": [1, "}"]}}}\n</tool_call>\n'
    '<tool_call>\n{"arguments": {"a": 1}, "name": "add"}\n</tool_call>'
)


def _plan(choice: object = "auto", template: str | None = None) -> ToolPlan:
    plan = plan_tools(TOOLS, choice, None, template)
    assert plan is not None
    return plan


def test_whole_text_parses_into_content_and_calls() -> None:
    parsed = parse_output(_plan(), TEXT)
    assert parsed.content == "Let me check."
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        ("get_weather", '{"city": "Pa}ris", "x": {"y": [1, "}"]}}'),  # as written, braces in strings and all
        ("add", '{"a": 1}'),  # key order other than name-first: parsed whole, re-serialised
    ]
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in parsed.tool_calls)


@given(st.lists(st.integers(1, 12), min_size=1, max_size=60))
@settings(max_examples=60, deadline=None)
def test_streamed_pieces_add_up_to_the_whole(cuts: list[int]) -> None:
    pieces, pos = [], 0
    for size in cuts * (len(TEXT) // sum(cuts) + 1):
        pieces.append(TEXT[pos : pos + size])
        pos += size
        if pos >= len(TEXT):
            break
    content, calls = streamed_calls(_plan(), pieces)
    assert content.strip() == "Let me check."
    whole = parse_output(_plan(), TEXT)
    assert [name for name, _ in calls] == [c.name for c in whole.tool_calls]
    assert [args for _, args in calls] == [c.arguments for c in whole.tool_calls]


def test_what_is_not_a_call_of_a_known_tool_stays_content() -> None:
    plan = _plan()
    assert parse_output(plan, "see <tool_ca").content == "see <tool_ca"  # a held-back prefix comes out at the end
    bad = 'x <tool_call>{"name": "nope", "arguments": {}}</tool_call>'
    assert parse_output(plan, bad).content == bad and not parse_output(plan, bad).tool_calls
    cut = parse_output(plan, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert cut.content is None and cut.tool_calls[0].arguments == '{"city": "Pa'  # max_tokens cut it


def test_plans_and_their_constraints() -> None:
    assert plan_tools(None, None, None, None) is None
    assert _plan().constraint is None and not _plan().native
    assert _plan(template="... <tool_call> ...").native
    required = _plan("required").constraint
    named = _plan({"type": "function", "function": {"name": "add"}}).constraint
    assert required is not None and named is not None and required.kind == ConstraintKind.GRAMMAR
    assert '("\\n" call)*' in required.spec and "get_weather" in required.spec and "get_weather" not in named.spec
    assert "call)*" not in plan_tools(TOOLS, "required", False, None).constraint.spec  # type: ignore[union-attr]
    for constraint in (required, named):
        grammar_text(constraint)  # compiles
    messages, tools = _plan().prompt([{"role": "user", "content": "hi"}])
    assert tools is None and messages[0]["role"] == "system" and "get_weather" in messages[0]["content"]
    history = [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": '{"a": 1}'}}]}]
    [_, turn] = _plan().prompt(history)[0]
    assert turn["content"] == '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>' and "tool_calls" not in turn
    assert _plan(template="<tool_call>").prompt(history) == (history, [TOOLS[0], {"type": "function", "function": {"name": "add"}}])


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ([{"type": "function", "function": {"name": "a b"}}], None, "tools[0].function.name"),
        ([{"type": "retrieval"}], None, "tools[0]"),
        (TOOLS + TOOLS[:1], None, "tools[2].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], None, "tools[0].function.parameters"),
        (TOOLS, "sometimes", "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "missing"}}, "tool_choice"),
        (None, "required", "tool_choice"),
    ],
)
def test_bad_tools_name_the_field(tools: list | None, choice: object, param: str) -> None:
    with pytest.raises(APIError) as info:
        plan_tools(tools, choice, None, None)
    assert info.value.param == param


def test_required_constraint_accepts_exactly_the_format(smollm2_dir) -> None:  # type: ignore[no-untyped-def]
    from lmserve.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(smollm2_dir)
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size)
    constraint = _plan("required").constraint
    assert constraint is not None
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    matcher = compiler.matcher(constraint)
    assert all(matcher.accept(t) for t in tokenizer.encode(good, add_special_tokens=False))
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"town": 1}}'
    matcher = compiler.matcher(constraint)
    assert not all(matcher.accept(t) for t in tokenizer.encode(bad, add_special_tokens=False))
    assert json.loads(good.split("\n")[1])["arguments"] == {"city": "Oslo"}
