"""One sweep point's requests -> its figures, computed as `vllm bench serve` computes them.

Throughput is output tokens (from each response's usage) over the point's duration (the first request's
start to the last response's end); percentiles are numpy's linear ones; TPOT is per request,
(latency - TTFT) / (output tokens - 1); goodput counts the requests that meet every SLO.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

_MAX_ERRORS_KEPT = 5


@dataclass(frozen=True)
class RequestRecord:
    start_s: float  # perf_counter at the request's start
    done_s: float  # perf_counter when the response had been read to its end
    ttft_s: float | None = None
    latency_s: float | None = None  # to the last token chunk
    tpot_s: float | None = None
    itl_s: tuple[float, ...] = ()
    prompt_tokens: int | None = None
    output_tokens: int = 0
    error: str | None = None  # None: served completely

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Slo:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met_by(self, record: RequestRecord) -> bool:
        if self.ttft_ms is not None and (record.ttft_s is None or record.ttft_s * 1000 > self.ttft_ms):
            return False
        # Like vllm bench, a request with a single output token has a TPOT of 0 here.
        return self.tpot_ms is None or (record.tpot_s or 0.0) * 1000 <= self.tpot_ms


@dataclass(frozen=True)
class Percentiles:
    """Milliseconds."""

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Percentiles:
        if not values:
            return cls(0.0, 0.0, 0.0, 0.0)
        ms = np.asarray(values, dtype=np.float64) * 1000
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(ms.mean()), float(p50), float(p90), float(p99))


@dataclass(frozen=True)
class PointSummary:
    concurrency: int
    num_requests: int
    num_failed: int
    duration_s: float
    output_tokens: int
    output_tok_s: float
    request_s: float
    mean_prompt_tokens: float
    ttft_ms: Percentiles
    tpot_ms: Percentiles
    itl_ms: Percentiles
    e2e_ms: Percentiles
    goodput_req_s: float
    goodput_fraction: float  # of all requests sent
    errors: list[str] = field(default_factory=list)


def summarize(records: Sequence[RequestRecord], concurrency: int, slo: Slo) -> PointSummary:
    if not records:
        raise ValueError("no requests were recorded")
    served = [r for r in records if r.ok]
    duration_s = max(r.done_s for r in records) - min(r.start_s for r in records)
    output_tokens = sum(r.output_tokens for r in served)
    prompt_lens = [r.prompt_tokens for r in served if r.prompt_tokens is not None]
    num_good = sum(1 for r in served if slo.met_by(r))
    return PointSummary(
        concurrency=concurrency,
        num_requests=len(records),
        num_failed=len(records) - len(served),
        duration_s=duration_s,
        output_tokens=output_tokens,
        output_tok_s=output_tokens / duration_s,
        request_s=len(served) / duration_s,
        mean_prompt_tokens=float(np.mean(prompt_lens)) if prompt_lens else 0.0,
        ttft_ms=Percentiles.of_seconds([r.ttft_s for r in served if r.ttft_s is not None]),
        tpot_ms=Percentiles.of_seconds([r.tpot_s for r in served if r.tpot_s is not None]),
        itl_ms=Percentiles.of_seconds([gap for r in served for gap in r.itl_s]),
        e2e_ms=Percentiles.of_seconds([r.latency_s for r in served if r.latency_s is not None]),
        goodput_req_s=num_good / duration_s,
        goodput_fraction=num_good / len(records),
        errors=[r.error for r in records if r.error is not None][:_MAX_ERRORS_KEPT],
    )
