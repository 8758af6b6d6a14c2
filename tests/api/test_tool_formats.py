"""The four tool-call formats on their own: which one a real chat template uses, what the prompt gets, each
format's streaming parser fed the SmolLM2 tokenizer's real token-by-token split of real texts (equal to the
whole text's parse), and each format's grammar for required / named calls (compiles, accepts the format's
own calls, refuses other text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve.api.reasoning import REASONING_FORMATS, reasoning_format
from lmserve.api.tool_calls import FunctionTool
from lmserve.api.tool_formats import TOOL_FORMATS, detect_tool_format
from lmserve.api.tools import ToolPlan, parse_output, plan_tools
from lmserve.config import REASONING_PARSERS, TOOL_CALL_PARSERS
from lmserve.engine.grammar import GrammarCompiler
from lmserve.tokenizer import Tokenizer
from lmserve.types import ConstraintKind, StructuredOutput
from tests.api.chat_formats import streamed_calls

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}},
    "required": ["city"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
CALLS = [("get_weather", {"city": "Pa}ris, \"FR\"", "days": 3, "metric": True}), ("get_time", {})]
# Each format's real output for CALLS, with text around it where the format has any.
TEXTS = {
    "hermes": 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ris, \\"FR\\"", "days": 3, '
    '"metric": true}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    "llama3_json": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Pa}ris, \\"FR\\"", "days": 3, '
    '"metric": true}}; {"name": "get_time", "parameters": {}}',
    "mistral": 'Let me look.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Pa}ris, \\"FR\\"", "days": 3, '
    '"metric": true}, "id": "abc123XYZ"}, {"name": "get_time", "arguments": {}}]',
    "pythonic": '[get_weather(city="Pa}ris, \\"FR\\"", days=3, metric=True), get_time()]',
}
CONTENT = {"hermes": "Let me look.", "llama3_json": None, "mistral": "Let me look.", "pythonic": None}


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_folder(smollm2_dir)


def _plan(name: str, choice: object = "auto", parallel: bool | None = None) -> ToolPlan:
    plan = plan_tools(TOOLS, choice, parallel, None, name)
    assert plan is not None and plan.format.name == name
    return plan


def test_the_parser_names_are_the_configs() -> None:
    assert tuple(TOOL_FORMATS) == TOOL_CALL_PARSERS and tuple(REASONING_FORMATS) == REASONING_PARSERS


@pytest.mark.parametrize(
    ("template", "tools", "reasoning"),
    [("qwen3.jinja", "hermes", "qwen3"), ("llama3.1_json.jinja", "llama3_json", None), ("mistral.jinja", "mistral", None)],
)
def test_real_templates_are_detected(template: str, tools: str, reasoning: str | None, tokenizer: Tokenizer) -> None:
    text = (TEMPLATES / template).read_text()
    assert detect_tool_format(text).name == tools  # type: ignore[union-attr]
    fmt = reasoning_format(None, text)
    assert (fmt.name if fmt else None) == reasoning
    assert detect_tool_format(tokenizer.hf_tokenizer.chat_template) is None  # SmolLM2's ignores tools
    assert reasoning_format(None, tokenizer.hf_tokenizer.chat_template) is None
    assert reasoning_format("deepseek_r1", None).name == "deepseek_r1"  # type: ignore[union-attr]


@pytest.mark.parametrize("name", list(TEXTS))
def test_real_texts_parse_whole_and_token_by_token_alike(name: str, tokenizer: Tokenizer) -> None:
    plan = _plan(name)
    whole = parse_output(plan, TEXTS[name])
    assert whole.content == CONTENT[name]
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == CALLS
    ids = tokenizer.encode(TEXTS[name], add_special_tokens=False)
    pieces = [tokenizer.decode(ids[i : i + 1]) for i in range(len(ids))]
    assert "".join(pieces) == TEXTS[name]
    content, calls = streamed_calls(plan, pieces)
    assert (content.strip() or None) == CONTENT[name]
    assert calls == [(c.name, c.arguments) for c in whole.tool_calls]  # the same bytes, piece by piece
    char_by_char = streamed_calls(plan, list(TEXTS[name]))
    assert char_by_char[1] == calls


@given(st.sampled_from(sorted(TEXTS)), st.lists(st.integers(1, 9), min_size=1, max_size=40))
@settings(max_examples=80, deadline=None)
def test_any_split_streams_the_same_calls(name: str, sizes: list[int]) -> None:
    text, pieces, pos = TEXTS[name], [], 0
    while pos < len(text):
        size = sizes[len(pieces) % len(sizes)]
        pieces.append(text[pos : pos + size])
        pos += size
    content, calls = streamed_calls(_plan(name), pieces)
    whole = parse_output(_plan(name), text)
    assert ((content.strip() or None), calls) == (whole.content, [(c.name, c.arguments) for c in whole.tool_calls])


@pytest.mark.parametrize("name", list(TEXTS))
def test_text_that_is_no_call_stays_content(name: str) -> None:
    plan = _plan(name)
    for text in ("Paris is sunny today.", "[1] is a footnote; {x} a set", '{"name": "nope", "parameters": {}}'):
        parsed = parse_output(plan, text)
        assert (parsed.content, parsed.tool_calls) == (text, [])
        content, calls = streamed_calls(plan, [text[i : i + 3] for i in range(0, len(text), 3)])
        assert (content, calls) == (text, [])


def test_formats_write_past_calls_and_describe_tools_for_templates_without_them() -> None:
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_time", "arguments": "{}"}}]},
    ]
    for name in TEXTS:
        plan = _plan(name)
        messages, tools = plan.prompt(history)
        assert tools is None and messages[0]["role"] == "system" and "get_weather" in messages[0]["content"]
        [turn] = parse_output(plan, messages[2]["content"]).tool_calls
        assert (turn.name, json.loads(turn.arguments)) == ("get_time", {})  # written so the format reads it back


@pytest.mark.parametrize("template", ["qwen3.jinja", "llama3.1_json.jinja", "mistral.jinja"])
def test_real_templates_render_the_tools_themselves(template: str, tokenizer: Tokenizer) -> None:
    text = (TEMPLATES / template).read_text()
    plan = plan_tools(TOOLS, "auto", None, text)
    assert plan is not None and plan.native
    messages, tools = plan.prompt([{"role": "user", "content": "weather in Oslo?"}])
    assert tools == TOOLS
    rendered = tokenizer.hf_tokenizer.apply_chat_template(messages, tools=tools, chat_template=text, tokenize=False,
                                                          add_generation_prompt=True)
    assert "get_weather" in rendered and "weather in Oslo?" in rendered


@pytest.mark.parametrize("name", list(TEXTS))
def test_forced_calls_grammar_accepts_the_format_and_only_it(name: str, tokenizer: Tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size)
    fmt = TOOL_FORMATS[name]
    tools = [FunctionTool(t["function"]["name"], None, t["function"]["parameters"]) for t in TOOLS]
    good = fmt.calls_text([(n, a) for n, a in CALLS])
    bad = fmt.calls_text([("get_weather", {"days": 3})])  # no city: the schema refuses it
    for parallel, text, ok in ((True, good, True), (False, good, False), (True, bad, False)):
        constraint = StructuredOutput(ConstraintKind.GRAMMAR, fmt.grammar(tools, parallel), param="tools")
        matcher = compiler.matcher(constraint)
        ids = tokenizer.encode(text, add_special_tokens=False)
        accepted = all(matcher.accept(t) for t in ids) and matcher.raw.is_accepting()
        assert accepted == ok, (name, parallel, text)
    parsed = parse_output(_plan(name), good)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == CALLS
    named = _plan(name, {"type": "function", "function": {"name": "get_time"}}).constraint
    assert named is not None and "get_weather" not in named.spec


def test_a_marker_held_as_a_special_token(tokenizer: Tokenizer) -> None:
    """Mistral's tokenizers hold [TOOL_CALLS] as a special token: the grammar writes that token, and the
    other special tokens that decoding then keeps (the end of turn) are hidden again."""
    from dataclasses import replace

    from lmserve.api.account import ChoiceResult
    from lmserve.api.presentation import Presenter
    from lmserve.types import FinishReason

    plan = replace(_plan("mistral", "required"), marker_ids=(("[TOOL_CALLS]", 7),), hidden_specials=("<|im_end|>",))
    assert plan.constraint is not None and plan.constraint.spec.startswith('start: <[7]> "[" call')
    text = '[TOOL_CALLS][{"name": "get_time", "arguments": {}}]<|im_end|>'
    choice = Presenter(1, 1, tool_plan=plan).choice(ChoiceResult(0, text, finish_reason=FinishReason.STOP))
    assert choice.content is None and [(c.name, c.arguments) for c in choice.tool_calls] == [("get_time", "{}")]
