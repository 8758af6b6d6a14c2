"""Which responses a load test counts as served, expected rejections, or failures."""

from __future__ import annotations

import email.utils

import pytest

from lmload.outcome import MAX_BACKOFF_S, Outcome, classify_grpc, classify_status, parse_retry_after


def test_200_is_served() -> None:
    assert classify_status(200, {}).outcome is Outcome.SERVED


@pytest.mark.parametrize("status", [429, 503])
def test_shedding_with_retry_after_is_expected(status: int) -> None:
    verdict = classify_status(status, {"retry-after": "2"}, '{"error": {}}')
    assert (verdict.outcome, verdict.retry_after_s, verdict.backoff_s) == (Outcome.REJECTED, 2.0, 2.0)


@pytest.mark.parametrize("status", [429, 503])
def test_shedding_without_retry_after_is_a_failure(status: int) -> None:
    verdict = classify_status(status, {}, "overloaded")
    assert verdict.outcome is Outcome.FAILED
    assert f"HTTP {status} without a valid Retry-After" in verdict.reason


@pytest.mark.parametrize("status", [0, 400, 401, 404, 500, 502, 504])
def test_any_other_status_is_a_failure(status: int) -> None:
    assert classify_status(status, {"retry-after": "1"}, "body").outcome is Outcome.FAILED


def test_long_retry_after_is_capped_for_the_user_backoff() -> None:
    verdict = classify_status(429, {"retry-after": "60"})
    assert verdict.retry_after_s == 60.0 and verdict.backoff_s == MAX_BACKOFF_S


def test_retry_after_as_an_http_date() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 7, usegmt=True), now=now) == pytest.approx(7.0)
    assert parse_retry_after(email.utils.formatdate(now - 7, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_grpc_statuses() -> None:
    assert classify_grpc("UNAVAILABLE", {"retry-after": "1"}).outcome is Outcome.REJECTED
    assert classify_grpc("RESOURCE_EXHAUSTED", {"retry-after": "3"}).retry_after_s == 3.0
    # RESOURCE_EXHAUSTED also means "message too large": without retry-after it is a failure
    assert classify_grpc("RESOURCE_EXHAUSTED", {}, "too large").outcome is Outcome.FAILED
    assert classify_grpc("INTERNAL", {"retry-after": "1"}, "bug").outcome is Outcome.FAILED
