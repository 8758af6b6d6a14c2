"""The reasoning parsers on their own: where Qwen3's real template leaves the output (enable_thinking on and
off), the split of real texts whole and token by token (equal), and the constraint that lets the model
think before a structured answer or forced tool calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmserve.api.reasoning import DEEPSEEK_R1, QWEN3, ReasoningPiece, ReasoningPlan
from lmserve.api.tools import plan_tools
from lmserve.engine.grammar import GrammarCompiler
from lmserve.tokenizer import Tokenizer
from lmserve.types import ConstraintKind, StructuredOutput

TEMPLATE = (Path(__file__).resolve().parents[1] / "data" / "chat_templates" / "qwen3.jinja").read_text()
THOUGHT = "<think>\nThe user wants 2+2. That is <b>4</b>.\n</think>\n\nIt is 4."


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_folder(smollm2_dir)


def _split(plan: ReasoningPlan, pieces: list[str]) -> tuple[str, str]:
    parser = plan.parser()
    out = [parser.feed(p) for p in pieces] + [parser.finish()]
    return "".join(p.reasoning for p in out), "".join(p.content for p in out)


def _tail(tokenizer: Tokenizer, **kwargs: object) -> str:
    return tokenizer.hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True, **kwargs
    )


def test_the_rendered_prompt_says_where_the_output_starts(tokenizer: Tokenizer) -> None:
    assert ReasoningPlan.for_prompt(QWEN3, _tail(tokenizer)).start == "open"
    off = ReasoningPlan.for_prompt(QWEN3, _tail(tokenizer, enable_thinking=False))
    assert off.start == "closed" and not off.has_reasoning  # the template wrote an empty think block
    assert ReasoningPlan.for_prompt(DEEPSEEK_R1, "<｜Assistant｜><think>\n").start == "inside"


@pytest.mark.parametrize(
    ("plan", "text", "reasoning", "content"),
    [
        (ReasoningPlan(QWEN3, "open"), THOUGHT, "The user wants 2+2. That is <b>4</b>.", "It is 4."),
        (ReasoningPlan(QWEN3, "open"), "It is 4, <think>not</think> here.", "", "It is 4, <think>not</think> here."),
        (ReasoningPlan(QWEN3, "inside"), "Two and two.\n</think>\n\nIt is 4.", "Two and two.", "It is 4."),
        (ReasoningPlan(DEEPSEEK_R1, "open"), "Two and two.</think>It is 4.", "Two and two.", "It is 4."),
        (ReasoningPlan(DEEPSEEK_R1, "open"), THOUGHT, "The user wants 2+2. That is <b>4</b>.", "It is 4."),
        (ReasoningPlan(QWEN3, "open"), "<think>cut off by max_tok", "cut off by max_tok", ""),
        (ReasoningPlan(QWEN3, "open"), "<thi", "", "<thi"),
    ],
)
def test_thinking_splits_whole_and_token_by_token_alike(
    plan: ReasoningPlan, text: str, reasoning: str, content: str, tokenizer: Tokenizer
) -> None:
    assert _split(plan, [text]) == (reasoning, content)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert _split(plan, [tokenizer.decode(ids[i : i + 1]) for i in range(len(ids))]) == (reasoning, content)
    assert _split(plan, list(text)) == (reasoning, content)


def test_streamed_thinking_goes_out_as_it_comes() -> None:
    parser = ReasoningPlan(QWEN3, "open").parser()
    assert parser.feed("<think>\nI ") == ReasoningPiece("I", "")
    assert parser.feed("think</") == ReasoningPiece(" think", "")  # a possible </think> is held back
    assert parser.feed("think>\n\nSo") == ReasoningPiece("", "So")


def test_constraints_apply_after_the_thinking(tokenizer: Tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size)
    schema = StructuredOutput(ConstraintKind.JSON_SCHEMA, json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                                                       "required": ["a"]}), param="response_format")
    tools = plan_tools([{"type": "function", "function": {"name": "f"}}], "required", False, TEMPLATE)
    assert tools is not None and tools.constraint is not None
    cases = [
        (ReasoningPlan(QWEN3, "open"), schema, '<think>\nhmm {no</think>\n\n{"a": 1}', True),
        (ReasoningPlan(QWEN3, "open"), schema, '{"a": 1}', True),  # a model may not think: it is not made to
        (ReasoningPlan(DEEPSEEK_R1, "inside"), schema, '{"a": 1}', False),  # the prompt opened it: it must end first
        (ReasoningPlan(DEEPSEEK_R1, "inside"), schema, 'hmm</think>{"a": 1}', True),
        (ReasoningPlan(QWEN3, "open"), tools.constraint, '<think>ok</think>\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', True),
        (ReasoningPlan(QWEN3, "open"), StructuredOutput(ConstraintKind.REGEX, "[0-9]+/[0-9]+", param="x"), "<think>a/b</think>1/2", True),
    ]
    for plan, constraint, text, ok in cases:
        wrapped = plan.constrain(constraint)
        matcher = compiler.matcher(wrapped)
        accepted = all(matcher.accept(t) for t in tokenizer.encode(text, add_special_tokens=False)) and matcher.raw.is_accepting()
        assert accepted == ok, text
    closed = ReasoningPlan(QWEN3, "closed")
    assert closed.constrain(schema) is schema
    grammar = StructuredOutput(ConstraintKind.GRAMMAR, 'start: "x"', param="structured_outputs.grammar")
    assert ReasoningPlan(QWEN3, "open").constrain(grammar) is grammar  # a client's grammar covers the whole output


def test_presented_choice_parses_calls_only_in_the_answer(tokenizer: Tokenizer) -> None:
    from lmserve.api.account import ChoiceDelta, ChoiceResult
    from lmserve.api.presentation import Presenter
    from lmserve.types import FinishReason, GenerationDelta

    tools = plan_tools([{"type": "function", "function": {"name": "f"}}], "auto", None, TEMPLATE)
    text = '<think>\nI could write <tool_call>{"name": "f", "arguments": {}}</tool_call> here.\n</think>\n\n' \
           'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    plan = ReasoningPlan(QWEN3, "open")
    whole = Presenter(1, 1, tool_plan=tools, reasoning_plan=plan).choice(ChoiceResult(0, text, finish_reason=FinishReason.STOP))
    assert whole.reasoning == 'I could write <tool_call>{"name": "f", "arguments": {}}</tool_call> here.'
    assert (whole.content, [(c.name, c.arguments) for c in whole.tool_calls]) == ("Sure.", [("f", '{"x": 1}')])
    assert whole.finish_reason == "tool_calls"
    presenter = Presenter(1, 1, tool_plan=tools, reasoning_plan=plan)
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [p for k, i in enumerate(ids) if (p := presenter.delta(ChoiceDelta(0, GenerationDelta(
        "r", tokenizer.decode([i]), [i], finish_reason=FinishReason.STOP if k == len(ids) - 1 else None)))) is not None]  # fmt: skip
    assert "".join(p.reasoning or "" for p in pieces) == whole.reasoning
    assert "".join(p.content or "" for p in pieces).strip() == whole.content
    assert "".join(c.arguments for p in pieces for c in p.tool_calls) == '{"x": 1}' and pieces[-1].finish_reason == "tool_calls"
    last_thought = max(k for k, p in enumerate(pieces) if p.reasoning)
    assert all(not (p.content or p.tool_calls) for p in pieces[: last_thought + 1])  # thinking first, then the answer
