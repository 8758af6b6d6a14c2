"""Transport-neutral generation: validated parameters -> engine requests -> merged choice stream -> result.

HTTP (api/http.py) and gRPC build a `GenerationParams` from their own wire types and then share every
step here, so limits, the n fan-out, seeds, usage accounting and metrics are identical on both:

    check_generation(params, num_prompts, limits)                         # raises APIError; before tokenizing
    plan = plan_generation(engine, prompts, params, limits, request_id)   # token ids, engine capacity
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

from lmserve.api.errors import APIError
from lmserve.config import LimitsConfig
from lmserve.engine.base import (
    EngineDeadError,
    EngineFaultError,
    EngineStepError,
    EngineStoppedError,
    GenerationEngine,
    QueueTimeoutError,
    RejectReason,
    RequestRejected,
)
from lmserve.logs import AccessRecord
from lmserve.metrics import Metrics
from lmserve.types import (
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    RequestTiming,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
)

if TYPE_CHECKING:
    from lmserve.safety import Decision, GuardStep

log = logging.getLogger(__name__)

MAX_LOGIT_BIAS = 100.0
# Temperatures below this sample greedily (vLLM's rule): dividing logits by ~1e-40 overflows to inf.
GREEDY_TEMPERATURE_EPS = 1e-5
# A repetition penalty near 0 divides logits into inf/NaN; a single such request would fail its whole
# engine step (everyone batched with it), so the edge refuses it.
MIN_REPETITION_PENALTY = 0.01
# Drafts beyond a few dozen are nearly never all accepted, and each one is a row of the step's forward.
MAX_SPECULATIVE_TOKENS = 32


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
    speculative_tokens: int | None = None  # prompt-lookup drafts per step; None: the server's default
    # How max_tokens defaults when absent: completions use a fixed 16 (OpenAI), chat fills the context.
    default_max_tokens: int | None = 16
    max_logprobs: int = 20
    # The request's own names for these fields, for errors: "prompt" | "messages" | ...,
    # "max_tokens" | "max_completion_tokens".
    prompt_param: str = "prompt"
    max_tokens_param: str = "max_tokens"
    # The client's own deadline in seconds from submission (HTTP: x-request-timeout / `timeout`); None: none.
    timeout_s: float | None = None
    timeout_param: str = "timeout"


@dataclass(frozen=True)
class GenerationPlan:
    """What one API request submits: len(prompts) * n engine requests; requests[i] is choice i."""

    request_id: str
    prompts: list[list[int]]
    n: int
    requests: list[GenerationRequest]
    params: GenerationParams = field(default_factory=lambda: GenerationParams())  # as the client sent them

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
    """One choice's account: its output, usage, finish and timings, fed every delta the client gets.

    The one record of a choice for both paths (`stream_choices` keeps it as it streams; `collect_choices`
    returns it) and both transports; usage, metrics and the access line are read from it.
    """

    index: int
    text: str = ""  # joined when the run ends, where the account keeps text
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    timing: RequestTiming | None = None  # the engine's, from the finishing delta
    first_token_at: float | None = None  # time.monotonic() when the first delta with tokens arrived
    last_token_at: float | None = None
    text_parts: list[str] | None = field(default=None, repr=False)  # None: text not kept

    def add(self, delta: GenerationDelta, now: float) -> None:
        if self.text_parts is not None:
            self.text_parts.append(delta.text)
        if delta.token_ids:
            self.token_ids.extend(delta.token_ids)
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at = now
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

    @property
    def finish_reason_str(self) -> str:
        """Why the choice ended; one closed before its finishing delta was aborted (client gone, error)."""
        return (self.finish_reason or FinishReason.ABORT).value

    def ttft_s(self, submitted: float) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - submitted

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.first_token_at is None or self.last_token_at is None or self.num_output_tokens <= 1:
            return None
        return (self.last_token_at - self.first_token_at) / (self.num_output_tokens - 1)


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


def check_generation(params: GenerationParams, num_prompts: int, limits: LimitsConfig) -> None:
    """Every check of a generation request that needs no token ids: the parameters and the number of
    prompts. Runs once, before the prompts are tokenized (and so before any work is spent on them);
    `plan_generation` then checks the token ids. Raises APIError(400) naming the parameter as sent."""
    if num_prompts < 1:
        raise APIError("At least one prompt is required.", "missing_field", params.prompt_param)
    if num_prompts > limits.max_prompts:
        raise APIError(f"At most {limits.max_prompts} prompts per request.", "invalid_value", params.prompt_param)
    if params.timeout_s is not None and not (math.isfinite(params.timeout_s) and params.timeout_s > 0):
        raise APIError(
            f"{params.timeout_param} must be a positive number of seconds, got {params.timeout_s}.",
            "invalid_value",
            params.timeout_param,
        )
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
    if params.speculative_tokens is not None and not 0 <= params.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
        raise APIError(
            f"speculative_tokens must be between 0 (off) and {MAX_SPECULATIVE_TOKENS}.", "invalid_value", "speculative_tokens"
        )
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
    """max_tokens for one prompt: as sent, or the default (completions: 16; chat: whatever room the context
    leaves), within the server's cap. Whether it fits beside the prompt is the engine's to say
    (check_request), and `rejection_error` words its answer."""
    if params.max_tokens is not None:
        return params.max_tokens
    room = max_model_len - prompt_len
    default = params.default_max_tokens if params.default_max_tokens is not None else room
    return max(1, min(default, room, limits.max_tokens_cap))


def build_sampling(
    params: GenerationParams, max_tokens: int, seed: int | None, logit_bias: tuple[tuple[int, float], ...] = ()
) -> SamplingParams:
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
        logit_bias=logit_bias,
        seed=seed,
        stop=params.stop,
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        skip_special_tokens=params.skip_special_tokens,
        include_stop_str_in_output=params.include_stop_str_in_output,
        structured=params.structured,
        speculative_tokens=params.speculative_tokens,
    )


def plan_generation(
    engine: GenerationEngine,
    prompts: Sequence[list[int]],
    params: GenerationParams,
    limits: LimitsConfig,
    request_id: str,
    vocab_size: int | None = None,
    lora: str | None = None,
) -> GenerationPlan:
    """Check the token ids and fan out: prompt i, choice j becomes engine request i*n + j with seed
    (seed + j). Call after `check_generation`, with the tokenized prompts.

    The engine's `check_request` (its capacity, a constraint it cannot compile) runs for every request
    before anything is queued, so a bad request costs nothing and never half-runs; its refusals come
    back as APIErrors naming the parameter the client sent (`rejection_error`).
    """
    # Ids the tokenizer and the model both know: the engine's embedding takes no others.
    vocab = engine.vocab_size if vocab_size is None else min(vocab_size, engine.vocab_size)
    logit_bias = parse_logit_bias(params.logit_bias, vocab)
    bad = next((t for t in params.stop_token_ids if t >= vocab), None)
    if bad is not None:
        raise APIError(
            f"stop_token_ids holds {bad}, which is not in the model's vocabulary (0..{vocab - 1}).",
            "invalid_value",
            "stop_token_ids",
        )
    requests: list[GenerationRequest] = []
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise APIError("The prompt must not be empty.", "invalid_value", params.prompt_param)
        if any(t < 0 or t >= vocab for t in prompt):
            raise APIError("Prompt token ids must be in the model's vocabulary.", "invalid_value", params.prompt_param)
        max_tokens = resolve_max_tokens(params, len(prompt), engine.max_model_len, limits)
        for j in range(params.n):
            seed = None if params.seed is None else params.seed + j
            req = GenerationRequest(
                prompt_token_ids=list(prompt),
                sampling=build_sampling(params, max_tokens, seed, logit_bias),
                request_id=f"{request_id}-{i * params.n + j}",
                timeout_s=params.timeout_s,
                queue_timeout_s=limits.queue_timeout_s or None,
                lora=lora,
            )
            try:
                engine.check_request(req)
            except RequestRejected as exc:
                raise rejection_error(exc, params, engine.max_model_len, len(prompt), max_tokens) from None
            requests.append(req)
    return GenerationPlan(request_id, [list(p) for p in prompts], params.n, requests, params)


def rejection_error(
    exc: RequestRejected,
    params: GenerationParams,
    max_model_len: int,
    num_prompt_tokens: int | None = None,
    max_tokens: int | None = None,
) -> APIError:
    """An engine's refusal as the client's error: the code, the parameter as the client named it, and,
    for the lengths (given the request's prompt length and max_tokens), what to change."""
    is_length = exc.reason in (RejectReason.PROMPT_TOO_LONG, RejectReason.OUTPUT_TOO_LONG)
    if is_length and num_prompt_tokens is not None and max_tokens is not None:
        limit = exc.max_seq_len if exc.max_seq_len is not None else max_model_len
        if limit >= max_model_len:
            said = f"This model's maximum context length is {max_model_len} tokens."
        else:  # the KV pool, not the context, is what one sequence cannot exceed here
            said = f"This server's KV cache holds at most {limit} tokens of one sequence."
        if exc.reason is RejectReason.PROMPT_TOO_LONG:
            return APIError(
                f"{said} However, the prompt has {num_prompt_tokens} tokens, which leaves no room for a completion. "
                "Please shorten the prompt.",
                "context_length_exceeded",
                params.prompt_param,
            )
        return APIError(
            f"{said} However, you requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
            f"prompt, {max_tokens} for the completion). Please reduce {params.max_tokens_param} to at most "
            f"{limit - num_prompt_tokens}, or shorten the prompt.",
            "context_length_exceeded",
            params.max_tokens_param,
        )
    if exc.reason is RejectReason.UNKNOWN_ADAPTER:
        return APIError(str(exc), "model_not_found", "model")
    if exc.reason is RejectReason.INVALID_CONSTRAINT:
        param = params.structured.param if params.structured is not None else "response_format"
        return APIError(f"Invalid {param}: {exc}", "invalid_value", param)
    if is_length:
        param = params.prompt_param if exc.reason is RejectReason.PROMPT_TOO_LONG else params.max_tokens_param
        return APIError(str(exc), "context_length_exceeded", param)
    param = params.max_tokens_param if exc.field == "max_tokens" else exc.field
    return APIError(str(exc), "invalid_value", param)


# -- running ---------------------------------------------------------------------------------------------


def engine_error(exc: BaseException, plan: GenerationPlan | None = None) -> APIError:
    """The APIError a transport reports for an exception out of the engine (`plan`: the run it ended)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestRejected):
        params = plan.params if plan is not None else GenerationParams()
        return rejection_error(exc, params, max_model_len=0)
    if isinstance(exc, EngineFaultError):
        return APIError(
            "The generation engine failed while serving this request; the server is restarting. Retry.",
            "engine_failure",
        )
    if isinstance(exc, QueueTimeoutError):
        return APIError(
            f"The server is overloaded: the request waited {exc.waited_s:g} s in the queue without being "
            "scheduled. Retry shortly.",
            "queue_timeout",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, EngineStepError):
        return APIError(f"Generation failed for this request: {exc}", "internal_error")
    if isinstance(exc, EngineStoppedError):
        return APIError("The server is shutting down: this request was stopped before it finished.", "service_unavailable")
    if isinstance(exc, EngineDeadError):
        return APIError("The generation engine is not running.", "service_unavailable")
    return APIError("Internal error while generating.", "internal_error")


@dataclass
class GenerationAccount:
    """The accounting of one plan's run: a ChoiceResult per choice, the usage they add up to, each
    choice's metrics (observed once, when it ends) and the access record."""

    plan: GenerationPlan
    submitted: float
    choices: list[ChoiceResult]
    _observed: set[int] = field(default_factory=set)

    @classmethod
    def start(cls, plan: GenerationPlan, keep_text: bool, submitted: float | None = None) -> GenerationAccount:
        choices = [ChoiceResult(index=i, text_parts=[] if keep_text else None) for i in range(len(plan.requests))]
        return cls(plan, time.monotonic() if submitted is None else submitted, choices)

    @property
    def keeps_text(self) -> bool:
        return bool(self.choices) and self.choices[0].text_parts is not None

    @property
    def usage(self) -> Usage:
        """What the choices used so far (all of it once they have ended); cached tokens are counted once
        per prompt, like prompt tokens."""
        choices = self.choices
        cached = sum(c.num_cached_tokens for c in choices[:: max(self.plan.n, 1)])
        return Usage(self.plan.num_prompt_tokens, sum(c.num_output_tokens for c in choices), cached)

    def observe(self, index: int, metrics: Metrics | None) -> None:
        """The choice's per-sequence metrics, once."""
        if metrics is None or index in self._observed:
            return
        self._observed.add(index)
        c = self.choices[index]
        metrics.observe_sequence(
            c.ttft_s(self.submitted), c.tpot_s, c.num_prompt_tokens, c.num_output_tokens, c.finish_reason_str, c.timing,
            self.plan.requests[index].lora,
        )

    def finish(self, metrics: Metrics | None, record: AccessRecord | None) -> None:
        """The run is over (ended, failed or closed): observe every choice not yet observed, join the
        texts, and fill the access record."""
        for index in range(len(self.choices)):
            self.observe(index, metrics)
        if self.keeps_text:
            for c in self.choices:
                c.text = "".join(c.text_parts or ())
        if record is not None:
            self.fill_record(record)

    def fill_record(self, record: AccessRecord) -> None:
        usage = self.usage  # the very figures the response's `usage` reports
        record.submitted = self.submitted
        record.prompt_tokens = usage.prompt_tokens
        record.completion_tokens = usage.completion_tokens
        record.cached_tokens = usage.cached_tokens
        record.finish_reasons = [c.finish_reason_str for c in self.choices]
        first_tokens = [c.first_token_at for c in self.choices if c.first_token_at is not None]
        record.first_token = min(first_tokens) if first_tokens else None
        record.timings = [c.timing for c in self.choices]
        if record.log_prompts and self.keeps_text:
            record.outputs = [c.text for c in self.choices]

    def result(self) -> GenerationResult:
        return GenerationResult(self.choices, self.usage)


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
    """One choice's output screen (service/lmserve/safety's OutputGuard): text in, what may be released out."""

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
    account: GenerationAccount | None = None,
) -> AsyncIterator[ChoiceDelta]:
    """The plan's choices as one stream of deltas; engine failures surface as APIError.

    Every delta the client gets goes into `account` (one is made if not given) before it is yielded,
    so the caller reads usage and results from it, during the stream and after.

    With `guards` (one output guard and its decision reporter per choice), each choice's text goes out
    as its guard releases it; a choice the guard blocks ends with finish_reason content_filter and its
    engine request is aborted at once, freeing its KV blocks.
    """
    if account is None:
        # Output text is kept only for an access line that will show it.
        account = GenerationAccount.start(plan, keep_text=record is not None and record.log_prompts)
    screens = None if guards is None else [_ScreenedChoice(g, report) for g, report in guards]
    ended: set[int] = set()
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
                account.choices[choice.index].add(delta, time.monotonic())
                # No output at all (token ids may be dropped where the safety filter changed the text, so the
                # count is what tells).
                if delta.finish_reason is FinishReason.TIMEOUT and all(c.num_output_tokens == 0 for c in account.choices):
                    raise _timed_out(plan)
                if delta.finish_reason is not None:
                    account.observe(choice.index, metrics)
                    log.debug(
                        "sequence %s finished (%s) after %d tokens",
                        delta.request_id, delta.finish_reason.value, delta.num_output_tokens,
                    )
                yield choice
    except (RequestRejected, EngineDeadError, EngineStepError, QueueTimeoutError) as exc:
        raise engine_error(exc, plan) from exc
    finally:
        account.finish(metrics, record)
        if metrics is not None:
            metrics.e2e_request_latency_seconds.observe(time.monotonic() - account.submitted)


def _timed_out(plan: GenerationPlan) -> APIError:
    """The request's own timeout passed before any choice produced a token: nothing to return but why."""
    timeout_s = plan.requests[0].timeout_s if plan.requests else None
    return APIError(
        f"The request's timeout ({timeout_s:g} s) passed before its first token was generated.",
        "request_timeout",
    )



async def collect_choices(
    engine: GenerationEngine,
    plan: GenerationPlan,
    metrics: Metrics | None = None,
    record: AccessRecord | None = None,
    guards: Sequence[tuple[OutputGuard, Callable[[list[Decision]], None]]] | None = None,
) -> GenerationResult:
    """Run the plan to completion: each choice's text, tokens and logprobs, and the usage."""
    account = GenerationAccount.start(plan, keep_text=True)
    async with aclosing(stream_choices(engine, plan, metrics, record, guards, account)) as stream:
        async for _ in stream:
            pass
    return account.result()
