"""What an HTTP status means for a load test: served, rejected as expected, or failed.

429 (rate limited) and 503 (overloaded) are a server shedding load as designed when they say when to
come back (Retry-After); without it, and for any other non-200 status, the request failed.
"""

from __future__ import annotations

import email.utils
import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass

MAX_BACKOFF_S = 5.0  # a user honours Retry-After up to this long, so a long one cannot stall a run
EXPECTED_REJECTIONS = frozenset({429, 503})


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
