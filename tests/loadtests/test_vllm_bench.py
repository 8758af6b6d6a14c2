"""Reading `vllm bench serve`'s printed summary (vllm_bench_summary.txt: one real run's, vLLM 0.32.0,
against lmserve at concurrency 1, 4 prompts of 128 tokens, 64 output tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmload.vllm_bench import BenchRun, parse_summary

SUMMARY = (Path(__file__).parent / "vllm_bench_summary.txt").read_text()


def test_every_figure_line_is_read() -> None:
    figures = parse_summary(SUMMARY)
    assert figures["Successful requests"] == 4
    assert figures["Maximum request concurrency"] == 1
    assert figures["Total generated tokens"] == 256
    assert figures["Output token throughput (tok/s)"] == 2.98
    assert figures["Median TTFT (ms)"] == 1280.26
    assert figures["P99 TPOT (ms)"] == 388.42
    assert figures["Mean ITL (ms)"] == 334.57
    assert not any("=" in name or "-" in name for name in figures)  # the banners are not figures


def test_compared_figures_use_exact_counts_for_rates() -> None:
    compared = BenchRun(parse_summary(SUMMARY), SUMMARY).compared()
    # the printed "Request throughput (req/s): 0.05" is rounded; 4 requests in 85.90 s is exact
    assert compared["request_s"] == pytest.approx(4 / 85.90)
    assert compared["output_tok_s"] == pytest.approx(256 / 85.90)
    assert compared["ttft_p50_ms"] == 1280.26 and compared["tpot_mean_ms"] == 319.96
    assert set(compared) == {
        "output_tok_s", "request_s", "ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms",
        "tpot_mean_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_mean_ms", "itl_p50_ms",
    }
