"""Transport-neutral generation: validated parameters -> engine requests -> merged choice stream -> result.

HTTP (api/http.py) and gRPC build a `GenerationParams` from their own wire types and then share every
step here, so limits, the n fan-out, seeds, usage accounting and metrics are identical on both:

    plan = plan_generation(engine, prompts, params, limits, request_id)   # raises APIError
    async for choice_delta in stream_choices(engine, plan, metrics, record): ...  # streaming
    result = await collect_choices(engine, plan, metrics, record)                 # non-streaming

`record` (the request's AccessRecord) gets the usage, finish reasons, first-token time and engine timings
when the stream ends, for the access line and the trace; `request_id` names the engine requests.

Closing the `stream_choices` iterator (or cancelling the task running `collect_choices`) closes every
engine stream, which aborts those requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from service.api.errors import APIError
from service.config import LimitsConfig
from service.engine.base import EngineDeadError, EngineStoppedError, GenerationEngine, RequestRejected
from service.logs import AccessRecord
from service.metrics import Metrics
from service.types import (
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    RequestTiming,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
)

if TYPE_CHECKING:
    from service.safety import Decision, GuardStep

log = logging.getLogger(__name__)

MAX_LOGIT_BIAS = 100.0
# Temperatures below this sample greedily (vLLM's rule): dividing logits by ~1e-40 overflows to inf.
GREEDY_TEMPERATURE_EPS = 1e-5
# A repetition penalty near 0 divides logits into inf/NaN; a single such request would fail its whole
# engine step (everyone batched with it), so the edge refuses it.
MIN_REPETITION_PENALTY = 0.01


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters as a client sent them (None: not sent), before per-prompt defaults."""

    max_tokens: int | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's JSON shape: {"token_id": bias}
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured: StructuredOutput | None = None  # response_format / structured_outputs / forced tool calls
    # How max_tokens defaults when absent: completions use a fixed 16 (OpenAI), chat fills the context.
    default_max_tokens: int | None = 16
    max_logprobs: int = 20
    prompt_param: str = "prompt"  # names the prompt field in errors ("prompt", "messages", "input")
    max_tokens_param: str = "max_tokens"


@dataclass(frozen=True)
class GenerationPlan:
    """What one API request submits: len(prompts) * n engine requests; requests[i] is choice i."""

    request_id: str
    prompts: list[list[int]]
    n: int
    requests: list[GenerationRequest]

    @property
    def num_prompt_tokens(self) -> int:
        """Usage counts each prompt once, however many choices it has (as OpenAI does)."""
        return sum(len(p) for p in self.prompts)

    @property
    def max_total_tokens(self) -> int:
        """The most tokens this plan can use: the token rate limit reserves this much."""
        return self.num_prompt_tokens + sum(r.sampling.max_tokens for r in self.requests)


@dataclass(frozen=True)
class ChoiceDelta:
    index: int
    delta: GenerationDelta


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    timing: RequestTiming | None = None

    def add(self, delta: GenerationDelta, text_parts: list[str]) -> None:
        text_parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        self.num_prompt_tokens = delta.num_prompt_tokens or self.num_prompt_tokens
        self.num_output_tokens = max(self.num_output_tokens, delta.num_output_tokens)
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
        if delta.timing is not None:
            self.timing = delta.timing


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class GenerationResult:
    choices: list[ChoiceResult]
    usage: Usage


# -- validation and planning ---------------------------------------------------------------------------


def _check_range(name: str, value: float | None, low: float, high: float, low_open: bool = False) -> None:
    if value is None:
        return
    if math.isnan(value) or value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise APIError(f"{name} must be in {bracket}{low}, {high}], got {value}.", "invalid_value", name)


def validate_params(params: GenerationParams, limits: LimitsConfig) -> None:
    """Everything checkable without the prompt; raises APIError(400) naming the parameter."""
    if not 1 <= params.n <= limits.max_n:
        raise APIError(f"n must be between 1 and {limits.max_n}, got {params.n}.", "invalid_value", "n")
    if params.max_tokens is not None:
        if params.max_tokens < 1:
            raise APIError("max_tokens must be at least 1.", "invalid_value", params.max_tokens_param)
        if params.max_tokens > limits.max_tokens_cap:
            raise APIError(
                f"max_tokens is {params.max_tokens}; this server allows at most {limits.max_tokens_cap}.",
                "invalid_value",
                params.max_tokens_param,
            )
    _check_range("temperature", params.temperature, 0.0, 2.0)
    _check_range("top_p", params.top_p, 0.0, 1.0, low_open=True)
    _check_range("min_p", params.min_p, 0.0, 1.0)
    _check_range("presence_penalty", params.presence_penalty, -2.0, 2.0)
    _check_range("frequency_penalty", params.frequency_penalty, -2.0, 2.0)
    _check_range("repetition_penalty", params.repetition_penalty, MIN_REPETITION_PENALTY, 2.0)
    if params.top_k is not None and params.top_k < -1:
        raise APIError("top_k must be -1 or 0 (off) or a positive integer.", "invalid_value", "top_k")
    if params.seed is not None and not -(2**63) <= params.seed <= 2**63 - 1:
        raise APIError("seed must fit in a signed 64-bit integer.", "invalid_value", "seed")
    if params.min_tokens < 0:
        raise APIError("min_tokens must be >= 0.", "invalid_value", "min_tokens")
    if params.max_tokens is not None and params.min_tokens > params.max_tokens:
        raise APIError("min_tokens must not exceed max_tokens.", "invalid_value", "min_tokens")
    if params.logprobs is not None and not 0 <= params.logprobs <= params.max_logprobs:
        raise APIError(
            f"logprobs must be between 0 and {params.max_logprobs}.", "invalid_value", "logprobs"
        )
    if len(params.stop) > limits.max_stop_strings:
        raise APIError(f"At most {limits.max_stop_strings} stop sequences are allowed.", "invalid_value", "stop")
    if any(s == "" for s in params.stop):
        raise APIError("Stop sequences must not be empty.", "invalid_value", "stop")
    if any(t < 0 for t in params.stop_token_ids):
        raise APIError("stop_token_ids must be non-negative.", "invalid_value", "stop_token_ids")
    parse_logit_bias(params.logit_bias)
    if params.structured is not None:
        # Compile time and memory grow with a grammar; no sane schema comes near the cap (the tests'
        # mid-sized one is ~1.5 KB).
        size = len(params.structured.spec.encode("utf-8"))
        if size > limits.max_grammar_bytes:
            raise APIError(
                f"{params.structured.param} is {size} bytes; this server compiles at most {limits.max_grammar_bytes}.",
                "invalid_value",
                params.structured.param,
            )


def parse_logit_bias(logit_bias: dict[str, float] | None, vocab_size: int | None = None) -> tuple[tuple[int, float], ...]:
    if not logit_bias:
        return ()
    pairs: list[tuple[int, float]] = []
    for key, bias in logit_bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise APIError(f"logit_bias keys must be token ids, got {key!r}.", "invalid_value", "logit_bias") from None
        if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
            raise APIError(f"logit_bias token id {token_id} is out of range.", "invalid_value", "logit_bias")
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise APIError("logit_bias values must be between -100 and 100.", "invalid_value", "logit_bias")
        pairs.append((token_id, float(bias)))
    return tuple(pairs)


def resolve_max_tokens(params: GenerationParams, prompt_len: int, max_model_len: int, limits: LimitsConfig) -> int:
    """max_tokens for one prompt; raises context_length_exceeded when prompt + max_tokens cannot fit."""
    room = max_model_len - prompt_len
    if room < 1:  # the prompt alone fills the context: no max_tokens would help
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, the prompt has "
            f"{prompt_len} tokens, which leaves no room for a completion. Please shorten the prompt.",
            "context_length_exceeded",
            params.prompt_param,
        )
    if params.max_tokens is not None:
        if params.max_tokens > room:
            raise APIError(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_len + params.max_tokens} tokens ({prompt_len} in the prompt, {params.max_tokens} for "
                f"the completion). Please reduce {params.max_tokens_param} to at most {room}, or shorten the prompt.",
                "context_length_exceeded",
                params.max_tokens_param,
            )
        return params.max_tokens
    default = params.default_max_tokens if params.default_max_tokens is not None else room
    return max(1, min(default, room, limits.max_tokens_cap))


def build_sampling(params: GenerationParams, max_tokens: int, seed: int | None, vocab_size: int | None = None) -> SamplingParams:
    temperature = 1.0 if params.temperature is None else params.temperature
    if temperature < GREEDY_TEMPERATURE_EPS:
        temperature = 0.0
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=min(params.min_tokens, max_tokens),
        temperature=temperature,
        top_k=0 if params.top_k in (None, -1) else params.top_k,
        top_p=1.0 if params.top_p is None else params.top_p,
        min_p=params.min_p or 0.0,
        repetition_penalty=1.0 if params.repetition_penalty is None else params.repetition_penalty,
        presence_penalty=params.presence_penalty or 0.0,
        frequency_penalty=params.frequency_penalty or 0.0,
        logit_bias=parse_logit_bias(params.logit_bias, vocab_size),
        seed=seed,
        stop=params.stop,
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        skip_special_tokens=params.skip_special_tokens,
        include_stop_str_in_output=params.include_stop_str_in_output,
        structured=params.structured,
    )


def plan_generation(
    engine: GenerationEngine,
    prompts: Sequence[list[int]],
    params: GenerationParams,
    limits: LimitsConfig,
    request_id: str,
    vocab_size: int | None = None,
) -> GenerationPlan:
    """Validate and fan out: prompt i, choice j becomes engine request i*n + j with seed (seed + j).

    Runs every check (ours, then the engine's `check_request`) before anything is queued, so a bad
    request costs nothing and never half-runs.
    """
    validate_params(params, limits)
    if not prompts:
        raise APIError("At least one prompt is required.", "missing_field", params.prompt_param)
    if len(prompts) > limits.max_prompts:
        raise APIError(f"At most {limits.max_prompts} prompts per request.", "invalid_value", params.prompt_param)
    if len(prompts) * params.n > limits.max_prompts * limits.max_n:
        raise APIError("Too many choices requested.", "invalid_value", "n")
    if vocab_size is not None:
        bad = next((t for t in params.stop_token_ids if t >= vocab_size), None)
        if bad is not None:
            raise APIError(
                f"stop_token_ids holds {bad}, which is not in the model's vocabulary (0..{vocab_size - 1}).",
                "invalid_value",
                "stop_token_ids",
            )
    requests: list[GenerationRequest] = []
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise APIError("The prompt must not be empty.", "invalid_value", params.prompt_param)
        if vocab_size is not None and any(t < 0 or t >= vocab_size for t in prompt):
            raise APIError("Prompt token ids must be in the model's vocabulary.", "invalid_value", params.prompt_param)
        max_tokens = resolve_max_tokens(params, len(prompt), engine.max_model_len, limits)
        for j in range(params.n):
            seed = None if params.seed is None else params.seed + j
            req = GenerationRequest(
                prompt_token_ids=list(prompt),
                sampling=build_sampling(params, max_tokens, seed, vocab_size),
                request_id=f"{request_id}-{i * params.n + j}",
            )
            try:
                engine.check_request(req)
            except RequestRejected as exc:
                param = params.max_tokens_param if exc.param == "max_tokens" else params.prompt_param
                if params.structured is not None and exc.param == params.structured.param:
                    param = exc.param  # the constraint's own field (response_format..., structured_outputs..., tools)
                raise APIError(str(exc), exc.code, param) from None
            requests.append(req)
    return GenerationPlan(request_id, [list(p) for p in prompts], params.n, requests)


# -- running ---------------------------------------------------------------------------------------------


def engine_error(exc: BaseException) -> APIError:
    """The APIError a transport reports for an exception out of the engine."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestRejected):
        return APIError(str(exc), exc.code, exc.param)
    if isinstance(exc, EngineStoppedError):
        return APIError("The server is shutting down: this request was stopped before it finished.", "service_unavailable")
    if isinstance(exc, EngineDeadError):
        return APIError("The generation engine is not running.", "service_unavailable")
    return APIError("Internal error while generating.", "internal_error")


@dataclass
class _SequenceTimer:
    """Per-sequence timing for TTFT/TPOT, reported once when the sequence ends."""

    submitted: float
    first_token: float | None = None
    last_token: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    timing: RequestTiming | None = None
    reported: bool = False

    def on_delta(self, delta: GenerationDelta, now: float) -> None:
        if delta.token_ids:
            if self.first_token is None:
                self.first_token = now
            self.last_token = now
        self.num_prompt_tokens = delta.num_prompt_tokens or self.num_prompt_tokens
        self.num_output_tokens = max(self.num_output_tokens, delta.num_output_tokens)
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if delta.timing is not None:
            self.timing = delta.timing

    @property
    def finish_reason_str(self) -> str:
        """Why the sequence ended; one closed before its finishing delta was aborted (client gone, error)."""
        return (self.finish_reason or FinishReason.ABORT).value

    def report(self, metrics: Metrics | None) -> None:
        if self.reported or metrics is None:
            return
        self.reported = True
        ttft = None if self.first_token is None else self.first_token - self.submitted
        tpot = None
        if self.first_token is not None and self.last_token is not None and self.num_output_tokens > 1:
            tpot = (self.last_token - self.first_token) / (self.num_output_tokens - 1)
        metrics.observe_sequence(
            ttft, tpot, self.num_prompt_tokens, self.num_output_tokens, self.finish_reason_str, self.timing
        )


async def _merged(
    engine: GenerationEngine, requests: list[GenerationRequest], ended: set[int]
) -> AsyncIterator[ChoiceDelta]:
    """Interleave several engine streams as their deltas arrive; closing this closes them all. A choice
    whose index the consumer puts in `ended` is closed (its engine request aborted) at its next delta."""
    if len(requests) == 1:
        async with aclosing(engine.generate(requests[0])) as stream:
            async for delta in stream:
                yield ChoiceDelta(0, delta)
                if ended:
                    return
        return

    queue: asyncio.Queue[tuple[int, GenerationDelta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, request: GenerationRequest) -> None:
        try:
            async with aclosing(engine.generate(request)) as stream:
                async for delta in stream:
                    if index in ended:
                        break
                    queue.put_nowait((index, delta))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which raises it
            queue.put_nowait((index, exc))
            return
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        num_open = len(tasks)
        while num_open:
            index, item = await queue.get()
            if item is None:
                num_open -= 1
            elif isinstance(item, BaseException):
                raise item
            elif index not in ended:
                yield ChoiceDelta(index, item)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OutputGuard(Protocol):
    """One choice's output screen (service/safety's OutputGuard): text in, what may be released out."""

    @property
    def is_holding(self) -> bool: ...

    def feed(self, text: str) -> GuardStep: ...

    def finish(self) -> GuardStep: ...


@dataclass
class _ScreenedChoice:
    """A choice's output as its guard lets it out. Token ids and logprobs are held with the text they
    belong to and released once the guard holds nothing back, if what it released is exactly the text
    they make; where it redacted or stripped anything among them they are dropped, so no token-level
    field carries what the text withholds."""

    guard: OutputGuard
    report: Callable[[list[Decision]], None]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    fed: list[str] = field(default_factory=list)  # raw text of the held tokens
    released: list[str] = field(default_factory=list)  # what the guard let out since they were held

    def screen(self, delta: GenerationDelta) -> GenerationDelta:
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.fed.append(delta.text)
        steps = [self.guard.feed(delta.text)]
        if steps[0].blocked is None and delta.finish_reason is not None:
            steps.append(self.guard.finish())
        text = ""
        blocked = None
        for step in steps:
            self.report(step.decisions)
            text += step.text
            blocked = blocked or step.blocked
        self.released.append(text)
        out = replace(delta, text=text, token_ids=[], logprobs=[] if delta.logprobs is not None else None)
        if blocked is not None:
            return replace(out, finish_reason=FinishReason.CONTENT_FILTER, stop_reason=None)
        if not self.guard.is_holding or delta.finish_reason is not None:
            if "".join(self.released) == "".join(self.fed):  # released unchanged: its tokens go with it
                out.token_ids = self.token_ids
                out.logprobs = self.logprobs if delta.logprobs is not None else None
            self.token_ids, self.logprobs, self.fed, self.released = [], None, [], []
        return out


async def stream_choices(
    engine: GenerationEngine,
    plan: GenerationPlan,
    metrics: Metrics | None = None,
    record: AccessRecord | None = None,
    guards: Sequence[tuple[OutputGuard, Callable[[list[Decision]], None]]] | None = None,
) -> AsyncIterator[ChoiceDelta]:
    """The plan's choices as one stream of deltas; engine failures surface as APIError.

    With `guards` (one output guard and its decision reporter per choice), each choice's text goes out
    as its guard releases it; a choice the guard blocks ends with finish_reason content_filter and its
    engine request is aborted at once, freeing its KV blocks.
    """
    started = time.monotonic()
    timers = [_SequenceTimer(started) for _ in plan.requests]
    screens = None if guards is None else [_ScreenedChoice(g, report) for g, report in guards]
    ended: set[int] = set()
    # Output text is gathered only for an access line that will show it.
    outputs: list[list[str]] | None = [[] for _ in plan.requests] if record is not None and record.log_prompts else None
    log.debug("submitting %d sequences, %d prompt tokens", len(plan.requests), plan.num_prompt_tokens)
    try:
        async with aclosing(_merged(engine, plan.requests, ended)) as merged:
            async for choice in merged:
                delta = choice.delta
                if screens is not None:
                    delta = screens[choice.index].screen(delta)
                    if delta.finish_reason is FinishReason.CONTENT_FILTER:
                        ended.add(choice.index)
                    choice = ChoiceDelta(choice.index, delta)
                timers[choice.index].on_delta(delta, time.monotonic())
                if outputs is not None:
                    outputs[choice.index].append(delta.text)
                if delta.finish_reason is not None:
                    timers[choice.index].report(metrics)
                    log.debug(
                        "sequence %s finished (%s) after %d tokens",
                        delta.request_id, delta.finish_reason.value, delta.num_output_tokens,
                    )
                yield choice
    except (RequestRejected, EngineDeadError) as exc:
        raise engine_error(exc) from exc
    finally:
        for timer in timers:
            timer.report(metrics)
        if metrics is not None:
            metrics.e2e_request_latency_seconds.observe(time.monotonic() - started)
        if record is not None:
            _fill_record(record, plan, started, timers, outputs)


def _fill_record(
    record: AccessRecord,
    plan: GenerationPlan,
    submitted: float,
    timers: list[_SequenceTimer],
    outputs: list[list[str]] | None,
) -> None:
    usage = usage_of(plan, timers)  # the very figures the response's `usage` reports
    record.submitted = submitted
    record.prompt_tokens = usage.prompt_tokens
    record.completion_tokens = usage.completion_tokens
    record.cached_tokens = usage.cached_tokens
    record.finish_reasons = [t.finish_reason_str for t in timers]
    first_tokens = [t.first_token for t in timers if t.first_token is not None]
    record.first_token = min(first_tokens) if first_tokens else None
    record.timings = [t.timing for t in timers]
    if outputs is not None:
        record.outputs = ["".join(parts) for parts in outputs]


async def collect_choices(
    engine: GenerationEngine,
    plan: GenerationPlan,
    metrics: Metrics | None = None,
    record: AccessRecord | None = None,
    guards: Sequence[tuple[OutputGuard, Callable[[list[Decision]], None]]] | None = None,
) -> GenerationResult:
    """Run the plan to completion and aggregate each choice's text, tokens and logprobs."""
    choices = [ChoiceResult(index=i) for i in range(len(plan.requests))]
    texts: list[list[str]] = [[] for _ in plan.requests]
    async with aclosing(stream_choices(engine, plan, metrics, record, guards)) as stream:
        async for choice in stream:
            choices[choice.index].add(choice.delta, texts[choice.index])
    for choice, parts in zip(choices, texts, strict=True):
        choice.text = "".join(parts)
    return GenerationResult(choices, usage_of(plan, choices))


class _SequenceTokens(Protocol):
    num_output_tokens: int
    num_cached_tokens: int


def usage_of(plan: GenerationPlan, choices: Sequence[_SequenceTokens]) -> Usage:
    """Usage of the plan's sequences (ChoiceResults or stream_choices' timers); cached tokens are
    counted once per prompt, like prompt tokens."""
    cached = sum(c.num_cached_tokens for c in choices[:: max(plan.n, 1)])
    return Usage(plan.num_prompt_tokens, sum(c.num_output_tokens for c in choices), cached)
