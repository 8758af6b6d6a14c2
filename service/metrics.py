"""Every Prometheus metric of the service, defined once, in a registry owned by one `Metrics` object.

No module-level registry: each server (and each test app) builds its own `Metrics`, so several apps can
live in one process without "Duplicated timeseries" errors. Names carry the `lmserve_` prefix and their
unit (`_seconds`, `_tokens`, `_total`). Both transports record through the same methods.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.engine.base import EngineStats
from service.types import RequestTiming

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests_total = Counter(
            "lmserve_requests_total",
            "Requests answered, by endpoint, transport and status (HTTP status code or gRPC code name).",
            ["endpoint", "transport", "status"],
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "lmserve_requests_in_flight", "Requests being served now (all endpoints).", ["transport"], registry=r
        )
        self.time_to_first_token_seconds = Histogram(
            "lmserve_time_to_first_token_seconds",
            "From submission to the engine until a sequence's first output token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.time_per_output_token_seconds = Histogram(
            "lmserve_time_per_output_token_seconds",
            "Mean time per output token after the first, per sequence.",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency_seconds = Histogram(
            "lmserve_e2e_request_latency_seconds",
            "Whole generation request (all choices) from admission to the last token.",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens_total = Counter(
            "lmserve_prompt_tokens_total", "Prompt tokens of finished generation sequences.", registry=r
        )
        self.generation_tokens_total = Counter(
            "lmserve_generation_tokens_total", "Output tokens generated.", registry=r
        )
        self.request_finished_total = Counter(
            "lmserve_request_finished_total",
            "Finished generation sequences by finish reason.",
            ["finish_reason"],
            registry=r,
        )
        self.embedding_tokens_total = Counter(
            "lmserve_embedding_tokens_total", "Input tokens embedded.", registry=r
        )
        self.num_requests_running = Gauge(
            "lmserve_num_requests_running", "Sequences in the engine's running batch.", registry=r
        )
        self.num_requests_waiting = Gauge(
            "lmserve_num_requests_waiting", "Sequences waiting in the engine for KV blocks.", registry=r
        )
        self.kv_blocks_used = Gauge("lmserve_kv_blocks_used", "KV cache blocks in use.", registry=r)
        self.kv_blocks_total = Gauge("lmserve_kv_blocks_total", "KV cache blocks in the pool.", registry=r)
        self.rate_limited_total = Counter(
            "lmserve_rate_limited_total", "Requests refused with 429 rate_limit_exceeded.", registry=r
        )
        self.overloaded_total = Counter(
            "lmserve_overloaded_total", "Requests refused with 503 server_overloaded.", registry=r
        )
        self.errors_total = Counter(
            "lmserve_errors_total", "API errors by code (see service/api/errors.py).", ["code"], registry=r
        )

    # -- recording helpers: one call per event, shared by both transports --------------------------------

    def observe_request(self, endpoint: str, transport: str, status: str | int) -> None:
        self.requests_total.labels(endpoint=endpoint, transport=transport, status=str(status)).inc()

    def observe_error(self, code: str) -> None:
        self.errors_total.labels(code=code).inc()
        if code == "rate_limit_exceeded":
            self.rate_limited_total.inc()
        elif code == "server_overloaded":
            self.overloaded_total.inc()

    def observe_sequence(
        self,
        ttft_s: float | None,
        tpot_s: float | None,
        num_prompt_tokens: int,
        num_output_tokens: int,
        finish_reason: str | None,
        timing: RequestTiming | None = None,
    ) -> None:
        if ttft_s is not None:
            self.time_to_first_token_seconds.observe(ttft_s)
        if tpot_s is not None:
            self.time_per_output_token_seconds.observe(tpot_s)
        self.prompt_tokens_total.inc(num_prompt_tokens)
        self.generation_tokens_total.inc(num_output_tokens)
        self.request_finished_total.labels(finish_reason=finish_reason or "abort").inc()

    def observe_engine(self, stats: EngineStats) -> None:
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_blocks_used.set(stats.num_kv_blocks_used)
        self.kv_blocks_total.set(stats.num_kv_blocks_total)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
