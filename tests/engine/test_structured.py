"""Constrained decoding in the engine, on a tiny random-weight Llama (its unconstrained output is noise, so
every valid output below is the grammar's doing).

- constrained rows validate at temperature 1 while unconstrained greedy rows in the same batches produce
  exactly the tokens they produce alone;
- max_tokens cuts a constrained sequence with finish_reason "length";
- preemption (recompute) keeps each matcher in step with its tokens;
- bad constraints are refused before anything is queued; the compiled-grammar cache is bounded.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import jsonschema
import pytest

from lmserve.config import EngineConfig
from lmserve.engine.base import RejectReason, RequestRejected
from lmserve.engine.engine import NativeEngine
from lmserve.engine.grammar import GrammarCompiler, GrammarError
from lmserve.types import (
    ConstraintKind,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    SamplingParams,
    StructuredOutput,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
JSON_SCHEMA = StructuredOutput(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA))
# Bounded: the longest output is about 60 tokens, far under max_tokens.
MAX_TOKENS = 120


async def _collect(engine: NativeEngine, requests: list[GenerationRequest]) -> list[list[GenerationDelta]]:
    async def one(request: GenerationRequest) -> list[GenerationDelta]:
        return [delta async for delta in engine.generate(request)]

    return list(await asyncio.gather(*(one(r) for r in requests)))


def _run(engine: NativeEngine, batches: list[list[GenerationRequest]]) -> list[list[list[GenerationDelta]]]:
    async def main() -> list[list[list[GenerationDelta]]]:
        await engine.start()
        try:
            return [await _collect(engine, batch) for batch in batches]
        finally:
            await engine.stop()

    return asyncio.run(main())


def _text(deltas: list[GenerationDelta]) -> str:
    return "".join(d.text for d in deltas)


def _tokens(deltas: list[GenerationDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def _prompt(i: int) -> list[int]:
    return [1000 + 7 * i + k for k in range(5 + i % 4)]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> NativeEngine:
    return NativeEngine.load(tiny_llama_dir, "tiny", EngineConfig(dtype="float32", num_kv_blocks=256))


def test_constrained_rows_validate_and_unconstrained_rows_are_untouched(engine: NativeEngine) -> None:
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    plain = [GenerationRequest(_prompt(i), greedy, f"plain{i}") for i in range(4)]
    constrained_kinds = [
        JSON_SCHEMA,
        StructuredOutput(ConstraintKind.JSON_OBJECT),
        StructuredOutput(ConstraintKind.REGEX, r"[0-9]{3}-[a-z]{2,4}"),
        StructuredOutput(ConstraintKind.CHOICE, json.dumps(["red", "green", "blue"])),
    ]
    mixed = list(plain)
    for i in range(8):
        constraint = constrained_kinds[i % len(constrained_kinds)]
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i, structured=constraint)
        mixed.append(GenerationRequest(_prompt(10 + i), params, f"c{i}"))
    alone, together = _run(engine, [plain, mixed])

    for i in range(4):
        assert _tokens(together[i]) == _tokens(alone[i]), f"unconstrained greedy row {i} changed beside constraints"
    for i, deltas in enumerate(together[4:]):
        text, finish = _text(deltas), deltas[-1].finish_reason
        kind = constrained_kinds[i % len(constrained_kinds)].kind
        assert finish == FinishReason.STOP, f"{kind}: {finish} after {text!r}"
        if kind == ConstraintKind.JSON_SCHEMA:
            jsonschema.validate(json.loads(text), SCHEMA)
        elif kind == ConstraintKind.JSON_OBJECT:
            assert isinstance(json.loads(text), dict)
        elif kind == ConstraintKind.REGEX:
            assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
        else:
            assert text in ("red", "green", "blue")
    assert engine.block_manager.num_used_blocks == 0


def test_max_tokens_cuts_a_constrained_sequence_with_length(engine: NativeEngine) -> None:
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, structured=JSON_SCHEMA)
    [[deltas]] = _run(engine, [[GenerationRequest(_prompt(1), params, "short")]])
    assert deltas[-1].finish_reason == FinishReason.LENGTH
    assert len(_tokens(deltas)) == 6
    text = _text(deltas)
    assert text.startswith('{"name": "'), text  # the partial text so far, as the grammar laid it out


def test_preemption_keeps_matchers_in_step(tiny_llama_dir: Path) -> None:
    # 8 blocks of 16 tokens; eight requests growing to ~70 tokens (5 blocks) each cannot all fit at once.
    config = EngineConfig(dtype="float32", block_size=16, num_kv_blocks=8, max_num_batched_tokens=64)
    engine = NativeEngine.load(tiny_llama_dir, "tiny", config)
    requests = [
        GenerationRequest(_prompt(i), SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i, structured=JSON_SCHEMA), f"p{i}")
        for i in range(8)
    ]
    [outputs] = _run(engine, [requests])
    assert engine.scheduler.num_preemptions_total > 0, "the pool was meant to force preemption"
    for deltas in outputs:
        assert deltas[-1].finish_reason == FinishReason.STOP
        jsonschema.validate(json.loads(_text(deltas)), SCHEMA)
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (StructuredOutput(ConstraintKind.JSON_SCHEMA, '{"type": "array", "uniqueItems": true}'), "uniqueItems"),
        (StructuredOutput(ConstraintKind.JSON_SCHEMA, '{"type": '), "not valid JSON"),
        (StructuredOutput(ConstraintKind.REGEX, "[a-"), "unclosed character class"),
        (StructuredOutput(ConstraintKind.CHOICE, "[]"), "non-empty list"),
        (StructuredOutput(ConstraintKind.GRAMMAR, "start: missing_rule"), "unknown name"),
    ],
)
def test_bad_constraints_are_refused_before_queueing(engine: NativeEngine, constraint: StructuredOutput, message: str) -> None:
    request = GenerationRequest([1, 2, 3], SamplingParams(max_tokens=4, structured=constraint), "bad")
    with pytest.raises(RequestRejected, match=re.escape(message)) as info:
        engine.check_request(request)
    assert (info.value.reason, info.value.field) == (RejectReason.INVALID_CONSTRAINT, "structured")


def test_compiled_grammar_cache_is_bounded(engine: NativeEngine) -> None:
    compiler = GrammarCompiler(engine.tokenizer, engine.runner.vocab_size, cache_size=2)
    for word in ("a", "b", "c"):
        compiler.matcher(StructuredOutput(ConstraintKind.CHOICE, json.dumps([word])))
    assert compiler.num_cached == 2
    with pytest.raises(GrammarError):
        compiler.matcher(StructuredOutput(ConstraintKind.REGEX, "("))
