"""A point's figures from its request records, against values worked out by hand."""

from __future__ import annotations

import pytest

from lmload.records import RequestRecord, Slo, summarize


def _served(start: float, ttft: float, latency: float, tokens: int, prompt: int = 10) -> RequestRecord:
    return RequestRecord(
        start_s=start, done_s=start + latency + 0.01, ttft_s=ttft, latency_s=latency,
        tpot_s=(latency - ttft) / (tokens - 1), itl_s=(0.1,) * (tokens - 1), prompt_tokens=prompt, output_tokens=tokens,
    )


def test_summary_matches_hand_computed_figures() -> None:
    records = [
        _served(0.0, 0.1, 1.0, 10),  # TPOT 0.1
        _served(0.5, 0.2, 2.0, 10),  # TPOT 0.2
        _served(1.0, 0.3, 1.2, 4, prompt=20),  # TPOT 0.3, ends at 2.2 + 0.01
        RequestRecord(start_s=1.5, done_s=1.6, error="HTTP 503"),
    ]
    s = summarize(records, concurrency=2, slo=Slo(ttft_ms=250, tpot_ms=250))
    assert (s.num_requests, s.num_failed, s.output_tokens) == (4, 1, 24)
    assert s.duration_s == pytest.approx(2.51)  # the first start (0.0) to the last end (0.5 + 2.0 + 0.01)
    assert s.output_tok_s == pytest.approx(24 / 2.51)
    assert s.request_s == pytest.approx(3 / 2.51)
    assert s.mean_prompt_tokens == pytest.approx(40 / 3)
    # numpy's linear percentiles of 100, 200, 300 ms
    assert (s.ttft_ms.mean, s.ttft_ms.p50, s.ttft_ms.p90, s.ttft_ms.p99) == pytest.approx((200, 200, 280, 298))
    assert (s.tpot_ms.p50, s.tpot_ms.p99) == pytest.approx((200, 298))
    assert s.itl_ms.p50 == pytest.approx(100)
    assert s.e2e_ms.p50 == pytest.approx(1200)
    # meets both SLOs: only the first two (TTFT 100/200 ms, TPOT 100/200 ms)
    assert s.goodput_req_s == pytest.approx(2 / 2.51)
    assert s.goodput_fraction == pytest.approx(0.5)
    assert s.errors == ["HTTP 503"]


def test_slo_on_ttft_only() -> None:
    records = [_served(0.0, 0.1, 1.0, 10), _served(0.0, 1.5, 3.0, 10)]
    assert summarize(records, 2, Slo(ttft_ms=1000)).goodput_fraction == 0.5
    assert summarize(records, 2, Slo()).goodput_fraction == 1.0


def test_no_records_is_an_error() -> None:
    with pytest.raises(ValueError):
        summarize([], 1, Slo())
