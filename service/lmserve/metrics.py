"""Every Prometheus metric of the service, defined once, in a registry owned by one `Metrics` object.

No module-level registry: each server (and each test app) builds its own `Metrics`, so several apps can
live in one process without "Duplicated timeseries" errors. Names carry the `lmserve_` prefix and their
unit (`_seconds`, `_tokens`, `_total`). Both transports record through the same methods. Labels stay
few and bounded: `model` (the served model's name), `endpoint` (known paths, else "other"), `transport`,
`status`, `code` (api/errors.py), `finish_reason`, and the safety filter's `direction`, `category` and `action`.

Where the numbers come from:
- requests, errors, rate limits: the transports, one call per request or error;
- per-sequence latencies and token counts: api/account.py when a sequence ends (`observe_sequence`);
- per-step and per-batch histograms: hooks the engine and embedder call from their threads after every
  step or batch (`observe_step`, `observe_embedding_batch`; wired in app.build_state);
- engine gauges and cumulative engine counters: `observe_engine(engine.stats())` at each scrape. A
  Counter cannot be set, so each one advances by what the engine counted since the previous scrape,
  which keeps every counter exactly equal to the work done.
"""

from __future__ import annotations

import time

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lmserve.engine.base import EngineStats, StepStats
from lmserve.types import RequestTiming

if TYPE_CHECKING:
    from lmserve.embeddings.batching import EmbeddingBatchStats

# Buckets span a GPU (about 1 ms per step) to a loaded CPU (seconds per token, minutes per request).
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
)
_TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)
_E2E_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0,
    30.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0,
)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Prompt and output lengths per sequence, 1-2-5 steps up to 100k tokens.
_TOKEN_COUNT_BUCKETS = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000,
)
_POWERS_OF_TWO = tuple(2**e for e in range(17))  # 1 .. 65536: sequences or tokens per step/batch

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The service's metrics. `model` and `embedding_model` are the served names (the `model` label).

    Metrics whose only label is `model` are bound to it here, so callers use them like unlabelled ones.
    """

    def __init__(
        self,
        model: str = "",
        embedding_model: str = "",
        registry: CollectorRegistry | None = None,
        rerank_model: str = "",
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model = model
        r = self.registry

        # -- requests (both transports) --------------------------------------------------------------
        self.requests_total = Counter(
            "lmserve_requests_total",
            "Requests answered, by endpoint, transport and status (HTTP status code or gRPC code name).",
            ["endpoint", "transport", "status"],
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "lmserve_requests_in_flight", "Requests being served now (all endpoints).", ["transport"], registry=r
        )
        self.errors_total = Counter(
            "lmserve_errors_total", "API errors by code (see service/lmserve/api/errors.py).", ["code"], registry=r
        )
        self.rate_limited_total = Counter(
            "lmserve_rate_limited_total", "Requests refused with 429 rate_limit_exceeded.", registry=r
        )
        self.overloaded_total = Counter(
            "lmserve_overloaded_total", "Requests refused with 503 server_overloaded.", registry=r
        )
        self.safety_decisions_total = Counter(
            "lmserve_safety_decisions_total",
            "Safety filter decisions by direction (input|output), category and action.",
            ["direction", "category", "action"],
            registry=r,
        )

        gen = _ModelScoped(r, model)
        emb = _ModelScoped(r, embedding_model)

        # -- generation, per sequence ------------------------------------------------------------------
        self.time_to_first_token_seconds = gen.histogram(
            "lmserve_time_to_first_token_seconds",
            "From submission to the engine until a sequence's first output token.",
            _LATENCY_BUCKETS,
        )
        self.time_per_output_token_seconds = gen.histogram(
            "lmserve_time_per_output_token_seconds",
            "Mean time per output token after the first (inter-token latency), per sequence of 2+ tokens.",
            _TPOT_BUCKETS,
        )
        self.e2e_request_latency_seconds = gen.histogram(
            "lmserve_e2e_request_latency_seconds",
            "Whole generation request (all choices) from admission to the last token.",
            _E2E_BUCKETS,
        )
        self.request_queue_time_seconds = gen.histogram(
            "lmserve_request_queue_time_seconds",
            "Engine time a sequence waited before its first step (arrival to first scheduled).",
            _LATENCY_BUCKETS,
        )
        self.request_prefill_time_seconds = gen.histogram(
            "lmserve_request_prefill_time_seconds",
            "Engine time from a sequence's first step to its first output token.",
            _LATENCY_BUCKETS,
        )
        self.request_decode_time_seconds = gen.histogram(
            "lmserve_request_decode_time_seconds",
            "Engine time from a sequence's first output token to its last.",
            _E2E_BUCKETS,
        )
        self.request_prompt_tokens = gen.histogram(
            "lmserve_request_prompt_tokens", "Prompt tokens per finished sequence.", _TOKEN_COUNT_BUCKETS
        )
        self.request_generation_tokens = gen.histogram(
            "lmserve_request_generation_tokens", "Output tokens per finished sequence.", _TOKEN_COUNT_BUCKETS
        )
        self.prompt_tokens_total = gen.counter(
            "lmserve_prompt_tokens_total",
            "Prompt tokens of finished sequences (a prompt with n choices counts n times).",
        )
        self.generation_tokens_total = gen.counter("lmserve_generation_tokens_total", "Output tokens generated.")
        # -- LoRA adapters ------------------------------------------------------------------------------
        self.lora_requests_total = Counter(
            "lmserve_lora_requests_total", "Finished generation sequences run with a LoRA adapter, by adapter.",
            ["model", "lora_adapter"], registry=r,
        )  # fmt: skip
        self.lora_prompt_tokens_total = Counter(
            "lmserve_lora_prompt_tokens_total", "Prompt tokens of finished sequences run with a LoRA adapter.",
            ["model", "lora_adapter"], registry=r,
        )  # fmt: skip
        self.lora_generation_tokens_total = Counter(
            "lmserve_lora_generation_tokens_total", "Output tokens generated with a LoRA adapter.",
            ["model", "lora_adapter"], registry=r,
        )  # fmt: skip
        self.lora_adapters_resident = gen.gauge(
            "lmserve_lora_adapters_resident", "LoRA adapters in the engine's slots now (at most --max-loras)."
        )
        self.lora_adapters_loaded = gen.gauge(
            "lmserve_lora_adapters_loaded", "LoRA adapters served by name (--lora-modules and run-time loads)."
        )
        self.lora_loads_total = gen.counter(
            "lmserve_lora_loads_total", "LoRA adapters loaded at run time (/v1/load_lora_adapter, gRPC LoadLoraAdapter)."
        )
        self.lora_unloads_total = gen.counter("lmserve_lora_unloads_total", "LoRA adapters unloaded at run time.")
        self.lora_reads_total = gen.counter(
            "lmserve_lora_reads_total", "Adapter folders read into host memory (loads, and reads after --max-cpu-loras evictions)."
        )
        self.lora_evictions_total = gen.counter(
            "lmserve_lora_evictions_total", "Adapters put out of a slot for another (--max-loras smaller than the adapters in use)."
        )
        self.lora_requests_info = Gauge(
            "lmserve_lora_requests_info",
            "vLLM's lora_requests_info: the adapters of the running and waiting requests (comma-separated), the "
            "value the scrape time.",
            ["model", "running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r,
        )  # fmt: skip
        self.request_finished_total = Counter(
            "lmserve_request_finished_total",
            "Finished generation sequences by finish reason (abort: the client left or the request failed).",
            ["model", "finish_reason"],
            registry=r,
        )

        # -- generation engine ---------------------------------------------------------------------------
        self.num_requests_running = gen.gauge(
            "lmserve_num_requests_running", "Sequences in the engine's running batch."
        )
        self.num_requests_waiting = gen.gauge(
            "lmserve_num_requests_waiting", "Sequences waiting in the engine for a step or KV blocks."
        )
        self.kv_blocks_used = gen.gauge("lmserve_kv_blocks_used", "KV cache blocks in use.")
        self.kv_blocks_capacity = gen.gauge("lmserve_kv_blocks_capacity", "KV cache blocks in the pool.")
        self.kv_cache_usage_ratio = gen.gauge(
            "lmserve_kv_cache_usage_ratio", "KV cache blocks in use over the pool (0 to 1)."
        )
        self.engine_steps_total = gen.counter("lmserve_engine_steps_total", "Engine steps completed.")
        self.preemptions_total = gen.counter(
            "lmserve_preemptions_total",
            "Running sequences preempted for lack of KV blocks (their KV is recomputed later).",
        )
        self.prefix_cache_query_tokens_total = gen.counter(
            "lmserve_prefix_cache_query_tokens_total",
            "Tokens looked up in the prefix cache when sequences were admitted (re-admissions too).",
        )
        self.prefix_cache_hit_tokens_total = gen.counter(
            "lmserve_prefix_cache_hit_tokens_total",
            "Looked-up tokens whose KV the prefix cache supplied (whole blocks).",
        )
        self.spec_decode_draft_tokens_total = gen.counter(
            "lmserve_spec_decode_draft_tokens_total",
            "Speculative (prompt-lookup) draft tokens verified by the model.",
        )
        self.spec_decode_accepted_tokens_total = gen.counter(
            "lmserve_spec_decode_accepted_tokens_total",
            "Draft tokens the model accepted; over the drafted ones, the acceptance rate.",
        )
        self.spec_decode_acceptance_ratio = gen.gauge(
            "lmserve_spec_decode_acceptance_ratio",
            "Accepted over drafted tokens since the engine started (0 before any draft).",
        )
        self.engine_step_sequences = gen.histogram(
            "lmserve_engine_step_sequences",
            "Sequences in one engine step's batch (prefill chunks and decodes).",
            _POWERS_OF_TWO,
        )
        self.engine_step_tokens = gen.histogram(
            "lmserve_engine_step_tokens", "Tokens one engine step computed.", _POWERS_OF_TWO
        )
        self.engine_step_duration_seconds = gen.histogram(
            "lmserve_engine_step_duration_seconds",
            "Wall time of one engine step (schedule, forward, sample, detokenize).",
            _STEP_BUCKETS,
        )

        # -- embeddings ----------------------------------------------------------------------------------
        self.embedding_tokens_total = emb.counter(
            "lmserve_embedding_tokens_total", "Input tokens embedded (the requests' usage)."
        )
        # The batch families count the rerank model's forwards too (the same batch loop), under its name.
        batches = Counter(
            "lmserve_embedding_batches_total", "Encoder forward passes (embedding and rerank models).", ["model"],
            registry=r,
        )  # fmt: skip
        batch_inputs = Histogram(
            "lmserve_embedding_batch_inputs", "Inputs (rerank: pairs) in one encoder forward.", ["model"],
            buckets=_POWERS_OF_TWO, registry=r,
        )  # fmt: skip
        padding = Counter(
            "lmserve_embedding_padding_tokens_total",
            "Pad positions encoder forwards computed besides the real tokens (batching waste).", ["model"], registry=r,
        )  # fmt: skip
        self.embedding_batches_total = batches.labels(model=embedding_model)
        self.embedding_batch_inputs = batch_inputs.labels(model=embedding_model)
        self.embedding_padding_tokens_total = padding.labels(model=embedding_model)
        self.rerank_tokens_total = _ModelScoped(r, rerank_model).counter(
            "lmserve_rerank_tokens_total", "Tokens of the (query, document) pairs the rerank model scored (usage)."
        )
        # Children for the rerank model only when one is served: no empty-named series otherwise.
        self._rerank_batch = (
            (batches.labels(model=rerank_model), batch_inputs.labels(model=rerank_model), padding.labels(model=rerank_model))
            if rerank_model
            else None
        )

        # The engine's cumulative totals at the previous scrape (see observe_engine).
        self._last_engine = EngineStats(0, 0, 0, 0, 0, False)

    # -- recording helpers: one call per event, shared by both transports --------------------------------

    def observe_request(self, endpoint: str, transport: str, status: str | int) -> None:
        self.requests_total.labels(endpoint=endpoint, transport=transport, status=str(status)).inc()

    def observe_error(self, code: str) -> None:
        self.errors_total.labels(code=code).inc()
        if code == "rate_limit_exceeded":
            self.rate_limited_total.inc()
        elif code == "server_overloaded":
            self.overloaded_total.inc()

    def observe_safety(self, direction: str, category: str, action: str) -> None:
        """One safety decision (service/lmserve/safety: direction input|output, category and action from the policy)."""
        self.safety_decisions_total.labels(direction=direction, category=category, action=action).inc()

    def observe_sequence(
        self,
        ttft_s: float | None,
        tpot_s: float | None,
        num_prompt_tokens: int,
        num_output_tokens: int,
        finish_reason: str | None,
        timing: RequestTiming | None = None,
        lora: str | None = None,
    ) -> None:
        """One generation sequence ended; `timing` is the engine's, absent when it ended before its
        finishing delta (client gone, engine error)."""
        if ttft_s is not None:
            self.time_to_first_token_seconds.observe(ttft_s)
        if tpot_s is not None:
            self.time_per_output_token_seconds.observe(tpot_s)
        if timing is not None:
            _observe_if_known(self.request_queue_time_seconds, timing.queue_s)
            _observe_if_known(self.request_prefill_time_seconds, timing.prefill_s)
            _observe_if_known(self.request_decode_time_seconds, timing.decode_s)
        self.request_prompt_tokens.observe(num_prompt_tokens)
        self.request_generation_tokens.observe(num_output_tokens)
        self.prompt_tokens_total.inc(num_prompt_tokens)
        self.generation_tokens_total.inc(num_output_tokens)
        self.request_finished_total.labels(model=self.model, finish_reason=finish_reason or "abort").inc()
        if lora is not None:
            self.lora_requests_total.labels(model=self.model, lora_adapter=lora).inc()
            self.lora_prompt_tokens_total.labels(model=self.model, lora_adapter=lora).inc(num_prompt_tokens)
            self.lora_generation_tokens_total.labels(model=self.model, lora_adapter=lora).inc(num_output_tokens)

    def observe_step(self, step: StepStats) -> None:
        """The engine's per-step hook (runs on the engine thread; prometheus-client is thread-safe)."""
        self.engine_step_sequences.observe(step.num_scheduled_seqs)
        self.engine_step_tokens.observe(step.num_batched_tokens)
        self.engine_step_duration_seconds.observe(step.duration_s)

    def observe_embedding_batch(self, batch: EmbeddingBatchStats) -> None:
        """The embedder's per-batch hook (runs on its worker thread)."""
        self.embedding_batches_total.inc()
        self.embedding_batch_inputs.observe(batch.num_inputs)
        self.embedding_padding_tokens_total.inc(batch.num_padding_tokens)

    def observe_rerank_batch(self, batch: EmbeddingBatchStats) -> None:
        """The reranker's per-batch hook (runs on its worker thread)."""
        if self._rerank_batch is not None:
            num_batches, num_inputs, num_padding = self._rerank_batch
            num_batches.inc()
            num_inputs.observe(batch.num_inputs)
            num_padding.inc(batch.num_padding_tokens)

    def observe_engine(self, stats: EngineStats) -> None:
        """At each scrape: the engine's gauges, and its cumulative counters advanced to its totals."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_blocks_used.set(stats.num_kv_blocks_used)
        self.kv_blocks_capacity.set(stats.num_kv_blocks_total)
        self.kv_cache_usage_ratio.set(stats.kv_usage)
        last = self._last_engine
        _advance(self.engine_steps_total, stats.num_steps_total, last.num_steps_total)
        _advance(self.preemptions_total, stats.num_preemptions_total, last.num_preemptions_total)
        _advance(
            self.prefix_cache_query_tokens_total,
            stats.num_prefix_cache_query_tokens_total,
            last.num_prefix_cache_query_tokens_total,
        )
        _advance(
            self.prefix_cache_hit_tokens_total,
            stats.num_prefix_cache_hit_tokens_total,
            last.num_prefix_cache_hit_tokens_total,
        )
        _advance(self.spec_decode_draft_tokens_total, stats.num_draft_tokens_total, last.num_draft_tokens_total)
        _advance(
            self.spec_decode_accepted_tokens_total, stats.num_accepted_tokens_total, last.num_accepted_tokens_total
        )
        self.spec_decode_acceptance_ratio.set(stats.num_accepted_tokens_total / max(stats.num_draft_tokens_total, 1))
        if stats.max_loras:
            self.lora_adapters_resident.set(stats.num_loras_resident)
            self.lora_adapters_loaded.set(stats.num_loras_loaded)
            _advance(self.lora_reads_total, stats.num_lora_loads_total, last.num_lora_loads_total)
            _advance(self.lora_evictions_total, stats.num_lora_evictions_total, last.num_lora_evictions_total)
            self.lora_requests_info.clear()
            self.lora_requests_info.labels(
                model=self.model, running_lora_adapters=",".join(stats.running_loras),
                waiting_lora_adapters=",".join(stats.waiting_loras), max_lora=str(stats.max_loras),
            ).set(time.time())  # fmt: skip
        self._last_engine = stats

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


class _ModelScoped:
    """Defines metrics whose only label is `model`, already bound to one model name."""

    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        self.registry = registry
        self.model = model

    def counter(self, name: str, doc: str) -> Counter:
        return Counter(name, doc, ["model"], registry=self.registry).labels(model=self.model)

    def gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(name, doc, ["model"], registry=self.registry).labels(model=self.model)

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, doc, ["model"], buckets=buckets, registry=self.registry).labels(model=self.model)


def _observe_if_known(histogram: Histogram, value: float | None) -> None:
    if value is not None:
        histogram.observe(value)


def _advance(counter: Counter, total: int, last_total: int) -> None:
    """Move `counter` by what a cumulative engine total gained since the last scrape. A total below
    the last one means a new engine counting from zero, so all of it is new."""
    counter.inc(total - last_total if total >= last_total else total)
