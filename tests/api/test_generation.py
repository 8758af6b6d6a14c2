"""The transport-neutral generation layer (service/lmserve/api/plan.py, account.py,
stream.py), without a transport.

Validation (check_generation, then plan_generation's token and engine checks), the mapping of the
engine's refusals to the client's parameter names, and the one per-choice account both the streaming and
the collecting path keep. The engine is a real NativeEngine over a tiny random-weight Llama; the deltas
fed to the account by hand are the engine's own dataclasses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmserve.api.errors import APIError
from lmserve.api.account import GenerationAccount
from lmserve.api.plan import GenerationParams, GenerationPlan, check_generation, plan_generation, rejection_error, resolve_max_tokens
from lmserve.api.stream import collect_choices, engine_error, stream_choices
from lmserve.config import EngineConfig, LimitsConfig
from lmserve.engine.base import RejectReason, RequestRejected
from lmserve.engine.engine import NativeEngine
from lmserve.logs import AccessRecord
from lmserve.metrics import Metrics
from lmserve.types import (
    ConstraintKind,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    RequestTiming,
    StructuredOutput,
)

LIMITS = LimitsConfig()
CHAT = dict(default_max_tokens=None, prompt_param="messages", max_tokens_param="max_completion_tokens")
MAX_MODEL_LEN = 64
BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> NativeEngine:
    """A context of 64 tokens and a pool of 8 blocks of 16 (128 tokens): the context is the limit."""
    config = EngineConfig(dtype="float32", max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE, num_kv_blocks=8)
    return NativeEngine.load(tiny_llama_dir, "tiny", config)


@pytest.fixture(scope="module")
def small_pool_engine(tiny_llama_dir: Path) -> NativeEngine:
    """The same context, but a pool of 2 blocks (32 tokens): the pool is the limit."""
    config = EngineConfig(dtype="float32", max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE, num_kv_blocks=2)
    return NativeEngine.load(tiny_llama_dir, "tiny", config)


def error_of(call) -> APIError:  # type: ignore[no-untyped-def]
    with pytest.raises(APIError) as info:
        call()
    return info.value


# -- check_generation: everything without token ids --------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "num_prompts", "expected"),
    [
        (GenerationParams(), 0, ("At least one prompt is required.", "missing_field", "prompt")),
        (GenerationParams(), 65, ("At most 64 prompts per request.", "invalid_value", "prompt")),
        (GenerationParams(n=17), 1, ("n must be between 1 and 16, got 17.", "invalid_value", "n")),
        (
            GenerationParams(max_tokens=5000, **CHAT),
            1,
            ("max_tokens is 5000; this server allows at most 4096.", "invalid_value", "max_completion_tokens"),
        ),
        (GenerationParams(max_tokens=0), 1, ("max_tokens must be at least 1.", "invalid_value", "max_tokens")),
        (
            GenerationParams(temperature=float("nan")),
            1,
            ("temperature must be in [0.0, 2.0], got nan.", "invalid_value", "temperature"),
        ),
        (GenerationParams(top_p=0.0), 1, ("top_p must be in (0.0, 1.0], got 0.0.", "invalid_value", "top_p")),
        (
            GenerationParams(min_tokens=9, max_tokens=8),
            1,
            ("min_tokens must not exceed max_tokens.", "invalid_value", "min_tokens"),
        ),
        (GenerationParams(stop=("a", "")), 1, ("Stop sequences must not be empty.", "invalid_value", "stop")),
        (
            GenerationParams(structured=StructuredOutput(ConstraintKind.REGEX, "a" * 70_000, "structured_outputs.regex")),
            1,
            (
                "structured_outputs.regex is 70000 bytes; this server compiles at most 65536.",
                "invalid_value",
                "structured_outputs.regex",
            ),
        ),
    ],
)
def test_check_generation_names_the_parameter_as_sent(
    params: GenerationParams, num_prompts: int, expected: tuple[str, str, str]
) -> None:
    error = error_of(lambda: check_generation(params, num_prompts, LIMITS))
    assert (error.message, error.code, error.param) == expected


def test_check_generation_passes_the_bounds_themselves() -> None:
    edge = GenerationParams(
        max_tokens=4096, n=16, temperature=2.0, top_p=1.0, min_p=0.0, repetition_penalty=0.01, min_tokens=4096
    )
    check_generation(edge, 64, LIMITS)


# -- resolve_max_tokens: defaults, never validation ----------------------------------------------------------


def test_max_tokens_defaults() -> None:
    assert resolve_max_tokens(GenerationParams(), 10, 64, LIMITS) == 16  # completions: OpenAI's 16
    assert resolve_max_tokens(GenerationParams(**CHAT), 10, 64, LIMITS) == 54  # chat: the room left
    assert resolve_max_tokens(GenerationParams(**CHAT), 10, 10_000, LIMITS) == 4096  # within the cap
    assert resolve_max_tokens(GenerationParams(**CHAT), 64, 64, LIMITS) == 1  # no room: the engine says so
    assert resolve_max_tokens(GenerationParams(max_tokens=100), 10, 64, LIMITS) == 100  # as sent


# -- plan_generation: token ids, fan-out, the engine's own limits -------------------------------------------


def test_plan_fans_out_choices_with_their_seeds(engine: NativeEngine) -> None:
    params = GenerationParams(n=2, seed=7, max_tokens=4, temperature=0.5, logit_bias={"5": 1.5})
    plan = plan_generation(engine, [[1, 2, 3], [4, 5]], params, LIMITS, "req")
    assert [r.request_id for r in plan.requests] == ["req-0", "req-1", "req-2", "req-3"]
    assert [r.prompt_token_ids for r in plan.requests] == [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]]
    assert [r.sampling.seed for r in plan.requests] == [7, 8, 7, 8]
    assert {r.sampling.logit_bias for r in plan.requests} == {((5, 1.5),)}
    assert (plan.num_prompt_tokens, plan.max_total_tokens) == (5, 5 + 4 * 4)
    assert plan.params is params


def test_plan_checks_token_ids_against_tokenizer_and_model(engine: NativeEngine) -> None:
    vocab = engine.vocab_size
    empty = error_of(lambda: plan_generation(engine, [[1], []], GenerationParams(), LIMITS, "r"))
    assert (empty.message, empty.param) == ("The prompt must not be empty.", "prompt")
    outside = error_of(lambda: plan_generation(engine, [[1, vocab]], GenerationParams(**CHAT), LIMITS, "r"))
    assert (outside.message, outside.param) == (
        f"The prompt holds token id {vocab}, which is not in the model's vocabulary (0..{vocab - 1}).", "messages"
    )
    # The smaller of the tokenizer's and the model's vocabularies bounds the ids and the logit bias keys.
    plan_generation(engine, [[vocab - 1]], GenerationParams(), LIMITS, "r")
    error_of(lambda: plan_generation(engine, [[vocab - 1]], GenerationParams(), LIMITS, "r", vocab_size=vocab - 1))
    bias = error_of(lambda: plan_generation(engine, [[1]], GenerationParams(logit_bias={str(vocab): 1.0}), LIMITS, "r"))
    assert (bias.message, bias.param) == (f"logit_bias token id {vocab} is out of range.", "logit_bias")


def test_context_refusals_name_what_the_client_must_change(engine: NativeEngine) -> None:
    too_long = [1] * MAX_MODEL_LEN
    for params in (GenerationParams(max_tokens=5), GenerationParams(**CHAT)):
        error = error_of(lambda params=params: plan_generation(engine, [too_long], params, LIMITS, "r"))
        assert error.code == "context_length_exceeded"
        assert error.param == params.prompt_param
        assert error.message == (
            "This model's maximum context length is 64 tokens. However, the prompt has 64 tokens, which leaves no "
            "room for a completion. Please shorten the prompt."
        )
    error = error_of(lambda: plan_generation(engine, [[1] * 60], GenerationParams(max_tokens=10, **CHAT), LIMITS, "r"))
    assert (error.code, error.param) == ("context_length_exceeded", "max_completion_tokens")
    assert error.message == (
        "This model's maximum context length is 64 tokens. However, you requested 70 tokens (60 in the prompt, "
        "10 for the completion). Please reduce max_completion_tokens to at most 4, or shorten the prompt."
    )
    plan_generation(engine, [[1] * 60], GenerationParams(max_tokens=4, **CHAT), LIMITS, "r")  # exactly fits


def test_a_pool_smaller_than_the_context_is_named_as_such(small_pool_engine: NativeEngine) -> None:
    error = error_of(lambda: plan_generation(small_pool_engine, [[1] * 30], GenerationParams(max_tokens=5), LIMITS, "r"))
    assert (error.code, error.param) == ("context_length_exceeded", "max_tokens")
    assert error.message == (
        "This server's KV cache holds at most 32 tokens of one sequence. However, you requested 35 tokens (30 in "
        "the prompt, 5 for the completion). Please reduce max_tokens to at most 2, or shorten the prompt."
    )
    # Chat's default fills the context's room (34), which the pool cannot hold: the same refusal.
    chat = error_of(lambda: plan_generation(small_pool_engine, [[1] * 30], GenerationParams(**CHAT), LIMITS, "r"))
    assert (chat.param, "at most 2," in chat.message) == ("max_completion_tokens", True)


def test_a_constraint_that_does_not_compile_is_refused_under_its_own_field(engine: NativeEngine) -> None:
    structured = StructuredOutput(ConstraintKind.REGEX, "[a-", "structured_outputs.regex")
    error = error_of(lambda: plan_generation(engine, [[1]], GenerationParams(structured=structured), LIMITS, "r"))
    assert (error.code, error.param) == ("invalid_value", "structured_outputs.regex")
    assert error.message.startswith("Invalid structured_outputs.regex: ") and "unclosed character class" in error.message


def test_engine_refusals_map_to_the_clients_names() -> None:
    chat = GenerationParams(**CHAT)
    unsupported = RequestRejected("seed -1 means no seed", RejectReason.UNSUPPORTED_VALUE, field="seed")
    assert rejection_error(unsupported, chat, 64).param == "seed"
    cap = RequestRejected("too many", RejectReason.UNSUPPORTED_VALUE, field="max_tokens")
    assert (rejection_error(cap, chat, 64).param, rejection_error(cap, chat, 64).code) == ("max_completion_tokens", "invalid_value")
    # Out of a running stream (no prompt length at hand): the engine's words, the client's parameter.
    late = RequestRejected("prompt too long", RejectReason.PROMPT_TOO_LONG, max_seq_len=64)
    plan = GenerationPlan("r", [[1]], 1, [], chat)
    assert (engine_error(late, plan).message, engine_error(late, plan).param) == ("prompt too long", "messages")
    grammar = RequestRejected("token 5 is not allowed here", RejectReason.INVALID_CONSTRAINT, field="structured")
    regex = GenerationParams(structured=StructuredOutput(ConstraintKind.REGEX, "a", "structured_outputs.regex"))
    error = engine_error(grammar, GenerationPlan("r", [[1]], 1, [], regex))
    assert (error.message, error.param) == ("Invalid structured_outputs.regex: token 5 is not allowed here", "structured_outputs.regex")


# -- the per-choice account ---------------------------------------------------------------------------------


def _delta(index: int, text: str, tokens: list[int], total: int, finish: FinishReason | None = None, cached: int = 0) -> GenerationDelta:
    timing = RequestTiming(10.0, 10.5, 11.0, 12.0) if finish is not None else None
    return GenerationDelta(
        f"r-{index}", text, tokens, finish_reason=finish, stop_reason="\n" if finish is FinishReason.STOP else None,
        num_prompt_tokens=3 if index < 2 else 2, num_output_tokens=total, num_cached_tokens=cached, timing=timing,
    )  # fmt: skip


def _sample_values(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "le" not in s.labels
    }


def test_account_adds_up_usage_finish_reasons_and_timings() -> None:
    """Two prompts (3 and 2 tokens), two choices each; choice 3 never finishes (its stream was closed)."""
    plan = GenerationPlan("r", [[1, 2, 3], [4, 5]], 2, [GenerationRequest([1])] * 4)
    account = GenerationAccount.start(plan, keep_text=True, submitted=100.0)
    feed = [
        (0, _delta(0, "he", [7], 1, cached=2), 100.5),
        (1, _delta(1, "a", [8], 1, cached=2), 100.6),
        (0, _delta(0, "llo", [9, 10], 3, FinishReason.STOP, cached=2), 101.5),
        (2, _delta(2, "x", [11], 1), 100.7),
        (1, _delta(1, "", [], 1, FinishReason.LENGTH, cached=2), 101.0),
        (2, _delta(2, "y", [12], 2, FinishReason.LENGTH), 100.9),
        (3, _delta(3, "z", [13], 1), 102.0),
    ]
    metrics = Metrics("tiny")
    for index, delta, now in feed:
        account.choices[index].add(delta, now)
        if delta.finish_reason is not None:
            account.observe(index, metrics)
            account.observe(index, metrics)  # once per choice, however often asked
    record = AccessRecord("r", "http", started=99.0, log_prompts=True)
    account.finish(metrics, record)

    usage = account.usage
    # Prompt and cached tokens count once per prompt, output tokens per choice.
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.total_tokens) == (5, 7, 2, 12)
    first = account.choices[0]
    assert (first.text, first.token_ids, first.finish_reason, first.stop_reason) == ("hello", [7, 9, 10], FinishReason.STOP, "\n")
    assert first.ttft_s(account.submitted) == 0.5 and first.tpot_s == 0.5  # 1.0 s over the 2 tokens after the first
    assert account.choices[1].tpot_s is None  # one output token: no time per token after it
    assert [c.outcome for c in account.choices] == ["stop", "length", "length", "abort"]
    assert (record.submitted, record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (100.0, 5, 7, 2)
    assert record.finish_reasons == ["stop", "length", "length", "abort"]
    assert record.first_token == 100.5
    assert record.timings == [RequestTiming(10.0, 10.5, 11.0, 12.0)] * 3 + [None]
    assert record.outputs == ["hello", "a", "xy", "z"]
    assert account.result().usage == usage and account.result().choices == account.choices

    values = _sample_values(metrics)
    finished = {reason: values[("lmserve_request_finished_total", (("finish_reason", reason), ("model", "tiny")))]
                for reason in ("stop", "length", "abort")}  # fmt: skip
    assert finished == {"stop": 1.0, "length": 2.0, "abort": 1.0}
    assert values[("lmserve_prompt_tokens_total", (("model", "tiny"),))] == 3 + 3 + 2 + 2
    assert values[("lmserve_generation_tokens_total", (("model", "tiny"),))] == 7


def test_an_account_without_text_keeps_none() -> None:
    plan = GenerationPlan("r", [[1, 2]], 1, [GenerationRequest([1])])
    account = GenerationAccount.start(plan, keep_text=False, submitted=0.0)
    account.choices[0].add(_delta(0, "secret", [7], 1, FinishReason.LENGTH), 1.0)
    record = AccessRecord("r", "grpc", started=0.0, log_prompts=False)
    account.finish(None, record)
    assert account.choices[0].text == "" and record.outputs is None
    assert (record.completion_tokens, record.finish_reasons) == (1, ["length"])


# -- one account for both paths, over a running engine -------------------------------------------------------


@pytest.fixture(scope="module")
def running(engine: NativeEngine) -> Iterator[tuple[NativeEngine, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    yield engine, loop
    loop.run_until_complete(engine.stop())
    loop.close()


def test_streaming_and_collecting_give_the_same_choices_and_usage(
    running: tuple[NativeEngine, asyncio.AbstractEventLoop],
) -> None:
    engine, loop = running
    params = GenerationParams(n=2, max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10]]

    async def both() -> tuple[GenerationAccount, list[int], object]:
        plan = plan_generation(engine, prompts, params, LIMITS, "s")
        account = GenerationAccount.start(plan, keep_text=True)
        order = [c.index async for c in stream_choices(engine, plan, account=account)]
        collected = await collect_choices(engine, plan_generation(engine, prompts, params, LIMITS, "c"))
        return account, order, collected

    account, order, collected = loop.run_until_complete(both())
    assert sorted(set(order)) == [0, 1, 2, 3]
    streamed = account.result()
    assert streamed.usage == collected.usage  # type: ignore[attr-defined]
    assert (streamed.usage.prompt_tokens, streamed.usage.completion_tokens) == (6, 4 * 6)
    for s, c in zip(streamed.choices, collected.choices, strict=True):  # type: ignore[attr-defined]
        assert (s.text, s.token_ids, s.finish_reason, s.num_output_tokens) == (c.text, c.token_ids, c.finish_reason, 6)
        assert s.finish_reason is FinishReason.LENGTH and s.timing is not None
    # Greedy: both choices of a prompt are the same sequence.
    assert streamed.choices[0].token_ids == streamed.choices[1].token_ids
    assert engine.block_manager.num_used_blocks == 0
