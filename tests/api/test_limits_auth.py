"""Pure units of the API layer: token buckets, admission, API keys, the error table, env config."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.api.auth import KeyStore, parse_bearer
from lmserve.api.errors import ERRORS, APIError
from lmserve.api.limits import AdmissionControl, RateLimiter, format_duration
from lmserve.config import LimitsConfig, serve_config_from_env


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_request_bucket_bursts_then_refills_at_the_steady_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=60, clock=clock)
    remaining = [int(limiter.check_request("k").values["x-ratelimit-remaining-requests"]) for _ in range(60)]
    assert remaining == list(range(59, -1, -1))
    with pytest.raises(APIError) as info:
        limiter.check_request("k")
    assert info.value.code == "rate_limit_exceeded" and info.value.http_status == 429
    assert info.value.headers["Retry-After"] == "1"  # one request refills every second
    assert info.value.headers["x-ratelimit-reset-requests"] == "1m0s"
    limiter.check_request("other")  # keys have their own buckets
    clock.now += 1.0
    limiter.check_request("k")


def test_token_reservation_refunds_unused_tokens() -> None:
    clock = FakeClock()
    limiter = RateLimiter(tokens_per_minute=100, clock=clock)
    reservation = limiter.reserve_tokens("k", 80)
    assert reservation.headers.values["x-ratelimit-remaining-tokens"] == "20"
    with pytest.raises(APIError):
        limiter.reserve_tokens("k", 30)
    reservation.settle(10)  # used 10 of 80
    reservation.settle(0)  # settling twice is a no-op
    assert limiter.reserve_tokens("k", 85).headers.values["x-ratelimit-remaining-tokens"] == "5"
    with pytest.raises(APIError) as info:
        limiter.reserve_tokens("k2", 101)  # more than the bucket can ever hold
    assert "Request too large" in info.value.message


def test_unlimited_limiter_sends_no_headers() -> None:
    limiter = RateLimiter()
    assert limiter.check_request("k").values == {}
    assert limiter.reserve_tokens("k", 10**9).headers.values == {}


def test_admission_is_bounded_and_release_is_idempotent() -> None:
    control = AdmissionControl(2)
    a, b = control.admit(), control.admit()
    with pytest.raises(APIError) as info:
        control.admit()
    assert info.value.code == "server_overloaded" and info.value.http_status == 503
    assert info.value.headers["Retry-After"] == "1"
    a.release()
    a.release()
    assert control.in_flight == 1
    with control.admit():
        assert control.in_flight == 2
    b.release()
    assert control.in_flight == 0


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (0.02, "20ms"), (1.5, "1.5s"), (20, "20s"), (360, "6m0s"), (61.2, "1m1s")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_keys_from_file_and_env_are_hashed(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# comment\n\nsk-one\n  sk-two  \n")
    store = KeyStore.from_sources(("sk-env",), str(key_file))
    assert len(store.digests) == 3
    assert all(isinstance(d, bytes) and len(d) == 32 for d in store.digests)  # sha256, never the key
    ids = {store.authenticate(f"Bearer {k}") for k in ("sk-one", "sk-two", "sk-env")}
    assert len(ids) == 3 and all(i.startswith("key-") for i in ids)
    for header in (None, "", "Bearer", "Basic sk-one", "Bearer sk-three"):
        with pytest.raises(APIError) as info:
            store.authenticate(header)
        assert info.value.code == "invalid_api_key"
        assert info.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert parse_bearer("bearer  tok ") == "tok"
    assert KeyStore.from_keys([]).authenticate(None) == "anonymous"


def test_error_table_is_complete() -> None:
    for code, kind in ERRORS.items():
        assert 400 <= kind.http_status < 600, code
        assert kind.grpc_status.isupper(), code
    expected = {
        "context_length_exceeded": 400,
        "invalid_value": 400,
        "missing_field": 400,
        "content_filter": 400,
        "invalid_api_key": 401,
        "model_not_found": 404,
        "not_found": 404,
        "method_not_allowed": 405,
        "request_too_large": 413,
        "rate_limit_exceeded": 429,
        "internal_error": 500,
        "server_overloaded": 503,
    }
    assert {c: ERRORS[c].http_status for c in expected} == expected
    assert APIError("m", "invalid_value", "n").to_dict() == {
        "error": {"message": "m", "type": "invalid_request_error", "param": "n", "code": "invalid_value"}
    }


def test_serve_config_from_env() -> None:
    env = {
        "LMSERVE_API_KEYS": "a, b,,",
        "LMSERVE_METRICS_OPEN": "true",
        "LMSERVE_CORS_ORIGINS": "http://x.test",
        "LMSERVE_MAX_QUEUE": "7",
        "LMSERVE_REQUESTS_PER_MINUTE": "100",
        "LMSERVE_DRAIN_TIMEOUT_S": "2.5",
    }
    out = serve_config_from_env(env)
    assert out["api_keys"] == ("a", "b")
    assert out["metrics_open"] is True
    assert out["cors_origins"] == ("http://x.test",)
    assert out["drain_timeout_s"] == 2.5
    assert out["limits"] == LimitsConfig(max_queue=7, requests_per_minute=100)
    assert serve_config_from_env({}) == {}
