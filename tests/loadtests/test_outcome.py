"""Which responses a load test counts as served, expected rejections, or failures, and how a served
generation's ending is reported."""

from __future__ import annotations

import email.utils

import pytest

from lmload.outcome import (
    MAX_BACKOFF_S,
    Ending,
    Outcome,
    classify_grpc,
    classify_status,
    judge_ending,
    parse_retry_after,
)


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


def test_a_generation_that_ran_to_max_tokens_keeps_the_plain_name() -> None:
    for ignore_eos in (True, False):
        ending = judge_ending("length", 8, max_tokens=8, ignore_eos=ignore_eos)
        assert ending == Ending("length") and ending.entry("chat stream") == "chat stream"
    assert judge_ending("length", None, max_tokens=8, ignore_eos=True).problem is None  # no usage: unchecked


def test_the_safety_filter_ending_is_counted_apart_not_failed() -> None:
    # The case: 47 of 128 tokens, then the toxicity filter ended the output.
    ending = judge_ending("content_filter", 47, max_tokens=128, ignore_eos=True)
    assert ending.problem is None and ending.filtered
    assert ending.entry("chat stream") == "chat stream [content_filter]"
    assert judge_ending("content_filter", 0, max_tokens=128, ignore_eos=False).entry("Complete") == "Complete [content_filter]"


def test_stop_is_its_own_outcome_without_ignore_eos_and_a_truncation_with_it() -> None:
    ending = judge_ending("stop", 5, max_tokens=8, ignore_eos=False)
    assert ending.problem is None and ending.entry("completion") == "completion [stop]" and not ending.filtered
    ending = judge_ending("stop", 5, max_tokens=8, ignore_eos=True)
    assert ending.problem is not None and "stop after 5 completion tokens of 8 although ignore_eos" in ending.problem
    assert ending.entry("completion") == "completion"  # a failure is reported under the plain name


@pytest.mark.parametrize(
    ("finish", "tokens", "message"),
    [
        ("length", 47, "truncated: 47 completion tokens, expected 128"),
        ("content_filter", 130, "130 completion tokens, more than max_tokens 128"),
        ("abort", 3, "finish_reason 'abort'"),
        ("timeout", 3, "finish_reason 'timeout'"),
    ],
)
def test_real_truncations_and_other_endings_fail(finish: str, tokens: int, message: str) -> None:
    for ignore_eos in (True, False):
        assert judge_ending(finish, tokens, max_tokens=128, ignore_eos=ignore_eos).problem == message
