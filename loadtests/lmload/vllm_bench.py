"""Runs `vllm bench serve` (through shared/peers/vllm-cpu.sh) and reads its summary.

vllm bench prints `Name (unit):  value` lines; they are read into a dict keyed by the name with its
unit, e.g. "Output token throughput (tok/s)" -> 516.5.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^([A-Z][A-Za-z0-9 ]+\([^)]*\)|[A-Z][A-Za-z ]+):\s+(-?[0-9.]+)\s*$")

# vllm bench's names -> the sweep's, for the figures both report.
COMPARED = {
    "Output token throughput (tok/s)": "output_tok_s",
    "Request throughput (req/s)": "request_s",
    "Mean TTFT (ms)": "ttft_mean_ms",
    "Median TTFT (ms)": "ttft_p50_ms",
    "P99 TTFT (ms)": "ttft_p99_ms",
    "Mean TPOT (ms)": "tpot_mean_ms",
    "Median TPOT (ms)": "tpot_p50_ms",
    "P99 TPOT (ms)": "tpot_p99_ms",
    "Mean ITL (ms)": "itl_mean_ms",
    "Median ITL (ms)": "itl_p50_ms",
}


@dataclass(frozen=True)
class BenchRun:
    figures: dict[str, float]  # every "Name (unit): value" line
    summary: str  # the printed result block, from its "Serving Benchmark Result" banner on

    def compared(self) -> dict[str, float]:
        out = {ours: self.figures[theirs] for theirs, ours in COMPARED.items() if theirs in self.figures}
        # vllm bench prints rates with two decimals (0.05 req/s at concurrency 1): use its exact counts.
        duration = self.figures.get("Benchmark duration (s)")
        if duration:
            if "Successful requests" in self.figures:
                out["request_s"] = self.figures["Successful requests"] / duration
            if "Total generated tokens" in self.figures:
                out["output_tok_s"] = self.figures["Total generated tokens"] / duration
        return out


def parse_summary(text: str) -> dict[str, float]:
    figures: dict[str, float] = {}
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match:
            figures[match.group(1).strip()] = float(match.group(2))
    return figures


def run_bench(
    script: Path, url: str, model: str, tokenizer: Path, concurrency: int, num_prompts: int, input_len: int,
    output_len: int, timeout_s: float,
) -> BenchRun:
    argv = ["bash", str(script), "bench", url, model, str(tokenizer), str(concurrency), str(num_prompts),
            str(input_len), str(output_len)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench failed ({proc.returncode}):\n{output[-3000:]}")
    figures = parse_summary(proc.stdout)
    if "Output token throughput (tok/s)" not in figures:
        raise RuntimeError(f"vllm bench printed no summary:\n{output[-3000:]}")
    banner = proc.stdout.rfind("Serving Benchmark Result")
    summary = proc.stdout[proc.stdout.rfind("\n", 0, banner) + 1 :] if banner >= 0 else proc.stdout[-3000:]
    return BenchRun(figures, summary)
