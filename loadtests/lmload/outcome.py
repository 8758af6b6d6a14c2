"""What a response means for a load test: served, rejected as expected, or failed; and, for a served
generation, how it ended.

429 (rate limited) and 503 (overloaded) are a server shedding load as designed when they say when to
come back (Retry-After); without it, and for any other non-200 status, the request failed.

A served generation ends with a finish_reason. `length` (max_tokens reached) is what a benchmark asks
for and is reported under the request's own name; `stop` (EOS or a stop string) and `content_filter`
(the server's safety filter ended the output) are outcomes of their own, reported as "NAME [stop]" and
"NAME [content_filter]". None of the three is a failure by itself: a truncation (a `length` ending short
of max_tokens with ignore_eos, a `stop` although ignore_eos was asked for) and any other reason
(`abort`, `timeout`, ...) are.
"""

from __future__ import annotations

import email.utils
import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass

MAX_BACKOFF_S = 5.0  # a user honours Retry-After up to this long, so a long one cannot stall a run
EXPECTED_REJECTIONS = frozenset({429, 503})
# finish_reason values a served generation may end with (OpenAI's names; lmserve's FinishReason)
LENGTH, STOP, CONTENT_FILTER = "length", "stop", "content_filter"


class Outcome(enum.Enum):
    SERVED = "served"
    REJECTED = "rejected"  # expected under load: come back after retry_after_s
    FAILED = "failed"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str = ""
    retry_after_s: float | None = None

    @property
    def backoff_s(self) -> float:
        return min(self.retry_after_s or 0.0, MAX_BACKOFF_S)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delay-seconds or an HTTP date); None when absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def classify_status(status: int, headers: Mapping[str, str], body: str = "") -> Verdict:
    """`headers` must look names up case-insensitively (as both HTTP clients' headers do)."""
    if status == 200:
        return Verdict(Outcome.SERVED)
    excerpt = body[:200]
    if status == 0:
        return Verdict(Outcome.FAILED, f"no response: {excerpt}")
    if status in EXPECTED_REJECTIONS:
        retry_after = parse_retry_after(headers.get("retry-after"))
        if retry_after is None:
            return Verdict(Outcome.FAILED, f"HTTP {status} without a valid Retry-After: {excerpt}")
        return Verdict(Outcome.REJECTED, f"HTTP {status}", retry_after)
    return Verdict(Outcome.FAILED, f"HTTP {status}: {excerpt}")


def classify_grpc(code_name: str, trailers: Mapping[str, str], details: str = "") -> Verdict:
    """A failed gRPC call by its status name: RESOURCE_EXHAUSTED / UNAVAILABLE with `retry-after` in the
    trailing metadata are the gRPC forms of 429 / 503; every other status is a failure."""
    if code_name in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
        retry_after = parse_retry_after(trailers.get("retry-after"))
        if retry_after is not None:
            return Verdict(Outcome.REJECTED, code_name, retry_after)
        return Verdict(Outcome.FAILED, f"{code_name} without a valid retry-after: {details[:200]}")
    return Verdict(Outcome.FAILED, f"{code_name}: {details[:200]}")


@dataclass(frozen=True)
class Ending:
    """How a served generation ended: its finish_reason, the label of its entry, or why it is a failure."""

    finish_reason: str
    label: str | None = None  # None: the run's normal ending (length), reported under the plain name
    problem: str | None = None  # set: the response is a failure (reported under the plain name)

    @property
    def filtered(self) -> bool:
        return self.finish_reason == CONTENT_FILTER

    def entry(self, name: str) -> str:
        """The Locust entry name this ending is reported under."""
        return name if self.label is None or self.problem else f"{name} [{self.label}]"


def judge_ending(
    finish_reason: str, completion_tokens: int | None, *, max_tokens: int | None, ignore_eos: bool
) -> Ending:
    """`completion_tokens` None: the server sent no usage (the counts go unchecked). `max_tokens` None: none
    was asked for."""
    tokens = f"{completion_tokens} completion tokens"
    if completion_tokens is None or max_tokens is None:
        tokens_short = False
    elif completion_tokens > max_tokens:
        return Ending(finish_reason, problem=f"{tokens}, more than max_tokens {max_tokens}")
    else:
        tokens_short = completion_tokens < max_tokens
    if finish_reason == CONTENT_FILTER:
        return Ending(finish_reason, CONTENT_FILTER)
    if finish_reason == LENGTH:
        if tokens_short:
            return Ending(finish_reason, problem=f"truncated: {tokens}, expected {max_tokens}")
        return Ending(finish_reason)
    if finish_reason == STOP:
        if ignore_eos:
            after = f" after {tokens} of {max_tokens}" if completion_tokens is not None else ""
            return Ending(finish_reason, problem=f"truncated: finish_reason stop{after} although ignore_eos was "
                          "set (--no-ignore-eos for a server without ignore_eos)")
        return Ending(finish_reason, STOP)
    return Ending(finish_reason, problem=f"finish_reason {finish_reason!r}")
