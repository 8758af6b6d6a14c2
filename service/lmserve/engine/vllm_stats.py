"""vLLM's per-step statistics as EngineStats and the on_step hook report them (`--engine vllm`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmserve.engine.base import StepStats


class VLLMStatsCollector:
    """vLLM's per-step statistics, kept the way EngineStats reports them.

    vLLM calls `record` (through the stat logger `logger_factory` makes) from AsyncLLM's output handler,
    on the event loop, once per engine step's outputs.
    """

    def __init__(self) -> None:
        self.num_running = 0
        self.num_waiting = 0
        self.kv_cache_usage = 0.0
        self.num_steps = 0
        self.num_preemptions = 0
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0
        self.on_step: Callable[[StepStats], None] | None = None

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        num_preempted = 0 if iteration_stats is None else int(iteration_stats.num_preempted_reqs)
        self.num_preemptions += num_preempted
        if scheduler_stats is None:
            return
        self.num_running = int(scheduler_stats.num_running_reqs)
        self.num_waiting = int(scheduler_stats.num_waiting_reqs) + int(scheduler_stats.num_skipped_waiting_reqs)
        self.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
        prefix = scheduler_stats.prefix_cache_stats
        # New admissions and re-admissions after preemption alike, as the native engine counts them.
        self.num_prefix_query_tokens += int(prefix.queries) + int(prefix.preempted_queries)
        self.num_prefix_hit_tokens += int(prefix.hits) + int(prefix.preempted_hits)
        details = scheduler_stats.iteration_details  # None for a step that computed nothing
        if details is None or details.is_dummy:
            return
        self.num_steps += 1
        if self.on_step is not None:
            self.on_step(
                StepStats(
                    num_scheduled_seqs=int(details.num_ctx_requests + details.num_generation_requests),
                    num_batched_tokens=int(details.num_ctx_tokens + details.num_generation_tokens),
                    num_preempted=num_preempted,
                    duration_s=float(details.elapsed_ms) / 1000.0,
                )
            )

    def logger_factory(self) -> Callable[[Any, int], Any]:
        """A per-engine stat logger class for AsyncLLM(stat_loggers=[...]) that forwards to this collector."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        collector = self

        class _ForwardingStatLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.engine_index = engine_index

            def record(
                self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
            ) -> None:
                collector.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _ForwardingStatLogger
