"""Locust's Aggregated row without the entries it should not count (entries.aggregated_entries).

Locust records every request event in its entry and in the total ("Aggregated"). Here a run's
RequestStats records the entries that the Aggregated row does not count in their own entry only: they
keep their row (in the console tables, the web UI and the --csv files), their failures still fail the
run (they are in the error report and set the exit code), and the total holds only what it counts. On a
distributed run each worker does this before reporting, so the master's total is the same.
"""

from __future__ import annotations

from typing import Any

from locust.stats import RequestStats, StatsError

from lmload.entries import Aggregated


def keep_out_of_aggregated(stats: RequestStats, aggregated: Aggregated) -> None:
    log_request, log_error = stats.log_request, stats.log_error

    def _log_request(method: str, name: str, response_time: Any, content_length: int) -> None:
        if aggregated(method, name):
            log_request(method, name, response_time, content_length)
        else:
            stats.entries[(name, method)].log(response_time, content_length)

    def _log_error(method: str, name: str, error: Exception | str | None) -> None:
        if aggregated(method, name):
            log_error(method, name, error)
            return
        stats.entries[(name, method)].log_error(error)
        key = StatsError.create_key(method, name, error)
        entry = stats.errors.get(key)
        if entry is None:
            entry = stats.errors[key] = StatsError(method, name, error)
        entry.occurred()

    # Instance attributes: the runner's request listener calls stats.log_request / stats.log_error.
    stats.log_request = _log_request  # type: ignore[method-assign]
    stats.log_error = _log_error  # type: ignore[method-assign]
