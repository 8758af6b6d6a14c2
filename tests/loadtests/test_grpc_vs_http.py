"""benchmarks/grpc_vs_http.py run whole at a tiny size, so the benchmark behind docs/benchmarks/transports.md's transport
figures keeps working: its server, the warm-up, both transports' streams and Tokenize, the table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.cli_process import REPO_ROOT, cli_env


def test_grpc_vs_http_runs_and_prints_both_transports(smollm2_dir: Path, cache_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/grpc_vs_http.py", "--concurrency", "1", "2", "--requests-per-user", "1",
         "--input-len", "16", "--output-len", "4", "--rounds", "2", "--tokenize-concurrency", "2",
         "--tokenize-seconds", "0.5", f"--server-arg=--cache-dir={cache_dir}", "--server-arg=--kv-cache-memory=0.25"],
        cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Every run printed, each round in the other order, and the table's rows.
    runs = re.findall(r"^round (\d) (http|grpc) c=\s*(\d+):\s+([\d.]+) tok/s", result.stdout, flags=re.M)
    assert [(r, t, c) for r, t, c, _ in runs] == [
        ("0", "http", "1"), ("0", "grpc", "1"), ("0", "http", "2"), ("0", "grpc", "2"),
        ("1", "grpc", "1"), ("1", "http", "1"), ("1", "grpc", "2"), ("1", "http", "2"),
    ]
    assert all(float(rate) > 0 for *_, rate in runs)
    assert re.search(r"^\| 1 \| [\d.]+ \| [\d.]+ \|", result.stdout, flags=re.M)
    assert re.search(r"^\| 2 \| [\d.]+ \| [\d.]+ \|", result.stdout, flags=re.M)
    tokenize = re.search(r"Tokenize \(unary, concurrency 2\): HTTP (\d+) calls/s, gRPC (\d+) calls/s", result.stdout)
    assert tokenize and int(tokenize[1]) > 0 and int(tokenize[2]) > 0
