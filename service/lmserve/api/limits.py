"""Per-key rate limits (token buckets) and the admission counter that turns overload into a quick 503.

Rate limits: one bucket per API key for requests/min and one for tokens/min. A bucket holds up to the
per-minute limit and refills continuously at limit/60 per second, so a client may burst up to the limit
and then proceeds at the steady rate. Token cost is reserved up front (prompt tokens + max_tokens per
choice, as OpenAI estimates it) and the unused part is refunded when the request finishes.

Admission: at most `max_queue` generation/embedding requests in flight per server. The engine queues
internally too, but an unbounded backlog only turns into timeouts; a 503 with Retry-After lets a load
balancer or client back off instead.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lmserve.api.errors import APIError

_MAX_TRACKED_KEYS = 10_000  # prune idle (full) buckets past this many keys


def format_duration(seconds: float) -> str:
    """Go-style durations as OpenAI sends them in x-ratelimit-reset-*: "20ms", "1.5s", "6m0s"."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{int(rest)}s"


@dataclass(frozen=True)
class BucketState:
    limit: int
    remaining: int
    reset_s: float  # time until the bucket is full again
    retry_after_s: float  # time until the requested amount would fit; 0 when it did


@dataclass
class _Level:
    tokens: float
    updated: float


class TokenBucket:
    """Per-key buckets of one kind (requests or tokens). A limit of 0 means unlimited."""

    def __init__(self, limit_per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit_per_minute
        self.refill_per_s = limit_per_minute / 60.0
        self._clock = clock
        self._levels: dict[str, _Level] = {}
        self._lock = threading.Lock()

    @property
    def is_enabled(self) -> bool:
        return self.limit > 0

    def _level(self, key: str, now: float) -> _Level:
        level = self._levels.get(key)
        if level is None:
            if len(self._levels) >= _MAX_TRACKED_KEYS:
                self._prune(now)
            level = self._levels[key] = _Level(float(self.limit), now)
        else:
            level.tokens = min(float(self.limit), level.tokens + (now - level.updated) * self.refill_per_s)
            level.updated = now
        return level

    def _prune(self, now: float) -> None:
        for key in [k for k, v in self._levels.items() if v.tokens + (now - v.updated) * self.refill_per_s >= self.limit]:
            del self._levels[key]

    def take(self, key: str, amount: int) -> tuple[bool, BucketState]:
        """Take `amount` if it fits now; (taken, state after)."""
        with self._lock:
            now = self._clock()
            level = self._level(key, now)
            taken = amount <= level.tokens
            if taken:
                level.tokens -= amount
                retry_after = 0.0
            elif amount > self.limit:
                retry_after = math.inf
            else:
                retry_after = (amount - level.tokens) / self.refill_per_s
            return taken, self._state(level, retry_after)

    def give_back(self, key: str, amount: int) -> None:
        if amount <= 0:
            return
        with self._lock:
            level = self._level(key, self._clock())
            level.tokens = min(float(self.limit), level.tokens + amount)

    def _state(self, level: _Level, retry_after: float) -> BucketState:
        reset = (self.limit - level.tokens) / self.refill_per_s
        return BucketState(self.limit, max(0, math.floor(level.tokens)), reset, retry_after)


@dataclass
class RateLimitHeaders:
    """The x-ratelimit-* headers for one response (empty when no limit is configured)."""

    values: dict[str, str]

    def merged(self, other: RateLimitHeaders) -> RateLimitHeaders:
        return RateLimitHeaders({**self.values, **other.values})


def _headers(kind: str, state: BucketState) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(state.limit),
        f"x-ratelimit-remaining-{kind}": str(state.remaining),
        f"x-ratelimit-reset-{kind}": format_duration(state.reset_s),
    }


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


@dataclass
class TokenReservation:
    """Tokens taken from a key's bucket; `settle(actual)` refunds what was not used."""

    bucket: TokenBucket | None
    key: str
    amount: int
    headers: RateLimitHeaders
    _settled: bool = False

    def settle(self, actual: int) -> None:
        if self._settled or self.bucket is None:
            return
        self._settled = True
        self.bucket.give_back(self.key, self.amount - actual)


class RateLimiter:
    def __init__(
        self, requests_per_minute: int = 0, tokens_per_minute: int = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.requests = TokenBucket(requests_per_minute, clock)
        self.tokens = TokenBucket(tokens_per_minute, clock)

    def check_request(self, key: str) -> RateLimitHeaders:
        """Count one request against `key`; raises APIError(rate_limit_exceeded) with headers."""
        if not self.requests.is_enabled:
            return RateLimitHeaders({})
        taken, state = self.requests.take(key, 1)
        headers = _headers("requests", state)
        if not taken:
            raise APIError(
                f"Rate limit reached: {self.requests.limit} requests per minute. "
                f"Retry after {format_duration(state.retry_after_s)}.",
                "rate_limit_exceeded",
                headers={**headers, "Retry-After": _retry_after(state.retry_after_s)},
            )
        return RateLimitHeaders(headers)

    def reserve_tokens(self, key: str, amount: int) -> TokenReservation:
        """Reserve `amount` tokens for `key`; raises APIError(rate_limit_exceeded) with headers."""
        if not self.tokens.is_enabled:
            return TokenReservation(None, key, amount, RateLimitHeaders({}))
        taken, state = self.tokens.take(key, amount)
        headers = _headers("tokens", state)
        if not taken:
            if math.isinf(state.retry_after_s):
                message = (
                    f"Request too large for the rate limit: it may use {amount} tokens and the limit is "
                    f"{self.tokens.limit} tokens per minute. Lower max_tokens or the prompt length."
                )
                retry = 60.0
            else:
                message = (
                    f"Rate limit reached: {self.tokens.limit} tokens per minute. "
                    f"Retry after {format_duration(state.retry_after_s)}."
                )
                retry = state.retry_after_s
            raise APIError(
                message, "rate_limit_exceeded", headers={**headers, "Retry-After": _retry_after(retry)}
            )
        return TokenReservation(self.tokens, key, amount, RateLimitHeaders(headers))


class Admission:
    """One admitted request; `release()` is idempotent so every exit path may call it."""

    def __init__(self, control: AdmissionControl) -> None:
        self._control = control
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._control._release()

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class AdmissionControl:
    """A bounded in-flight counter. `max_in_flight <= 0` disables the bound (but still counts)."""

    def __init__(self, max_in_flight: int, retry_after_s: int = 1) -> None:
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def admit(self) -> Admission:
        with self._lock:
            if 0 < self.max_in_flight <= self._in_flight:
                raise APIError(
                    f"The server is overloaded ({self._in_flight} requests in flight). Retry shortly.",
                    "server_overloaded",
                    headers={"Retry-After": str(self.retry_after_s)},
                )
            self._in_flight += 1
        return Admission(self)

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1
