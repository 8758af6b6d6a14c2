"""The account of one plan's run: each choice's output, usage, finish and timings, fed every delta the
client gets (api/stream.py), read by usage, metrics, the access line and the presentation step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lmserve.api.plan import GenerationPlan
from lmserve.logs import AccessRecord
from lmserve.metrics import Metrics
from lmserve.types import FinishReason, GenerationDelta, PromptLogprob, RequestTiming, TokenLogprob


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
    prompt_logprobs: list[PromptLogprob | None] | None = None  # with prompt_logprobs: from its first delta
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
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.num_prompt_tokens = delta.num_prompt_tokens or self.num_prompt_tokens
        self.num_output_tokens = max(self.num_output_tokens, delta.num_output_tokens)
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
        if delta.timing is not None:
            self.timing = delta.timing

    @property
    def outcome(self) -> str:
        """How the choice ended, for metrics and the access line: its finish reason, or "abort" for one
        closed before its finishing delta (client gone, error). What the client is told is presented
        apart (api/presentation.py)."""
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
            c.ttft_s(self.submitted), c.tpot_s, c.num_prompt_tokens, c.num_output_tokens, c.outcome, c.timing,
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
        record.finish_reasons = [c.outcome for c in self.choices]
        first_tokens = [c.first_token_at for c in self.choices if c.first_token_at is not None]
        record.first_token = min(first_tokens) if first_tokens else None
        record.timings = [c.timing for c in self.choices]
        if record.log_prompts and self.keeps_text:
            record.outputs = [c.text for c in self.choices]

    def result(self) -> GenerationResult:
        return GenerationResult(self.choices, self.usage)


