"""Headless Locust runs against a real lmserve process: every scenario, the overload shape, the sweep.

Each run is a subprocess bounded in time; its CSV statistics (or the sweep's JSON) are read back and
checked entry by entry.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.loadtests.conftest import LOADTESTS, ROOT, LmserveProcess

PROMPT_TOKENS = 24
OUTPUT_TOKENS = 8
RUN_LIMIT_S = 90  # Locust's own --run-time; a run normally ends long before
RUN_TIMEOUT_S = 180

EVERY_ENTRY = [
    ("POST", "chat stream"), ("TTFT", "chat stream"), ("ITL", "chat stream"),
    ("POST", "completion"), ("POST", "embeddings"), ("POST", "tokenize"), ("POST", "detokenize"),
    ("gRPC", "Tokenize"), ("gRPC", "Detokenize"), ("gRPC", "Embed"), ("gRPC", "Complete"),
    ("gRPC", "ChatStream"), ("TTFT", "grpc ChatStream"), ("ITL", "grpc ChatStream"),
]


def _argv(locustfile: str, server: LmserveProcess, csv_prefix: Path, *args: str, classes: tuple[str, ...] = ()) -> list[str]:
    # `args` first: an option such as --tags takes every word after it, so the class names come last,
    # behind options of one value.
    return [
        sys.executable, "-m", "locust", "-f", str(LOADTESTS / locustfile), *args, "--headless", "--only-summary",
        "--host", server.url, "--csv", str(csv_prefix), "--tokenizer", str(server.tokenizer_dir),
        "--prompt-tokens", str(PROMPT_TOKENS), "--output-tokens", str(OUTPUT_TOKENS),
        "--embedding-inputs", "2", "--embedding-tokens", "16", "--stop-timeout", "60", *classes,
    ]


def _locust(
    locustfile: str, server: LmserveProcess, csv_prefix: Path, *args: str, classes: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    argv = _argv(locustfile, server, csv_prefix, *args, classes=classes)
    return subprocess.run(argv, cwd=ROOT, env=server.env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _locust_until(
    server: LmserveProcess, csv_prefix: Path, entries: list[tuple[str, str]], *args: str
) -> subprocess.CompletedProcess[str]:
    """Runs locustfile.py until its live CSV holds every one of `entries` (then SIGTERM: Locust's graceful
    stop, in-flight requests finishing within --stop-timeout), or until its --run-time ends. A run takes
    as long as this machine needs to serve each scenario once, not a fixed time."""
    argv = _argv("locustfile.py", server, csv_prefix, "-t", f"{RUN_LIMIT_S}s", *args)
    proc = subprocess.Popen(argv, cwd=ROOT, env=server.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + RUN_LIMIT_S
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            stats = _stats(csv_prefix, live=True)
            if all(key in stats and int(stats[key]["Request Count"]) >= 1 for key in entries):
                proc.send_signal(signal.SIGTERM)
                break
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def _stats(csv_prefix: Path, live: bool = False) -> dict[tuple[str, str], dict[str, str]]:
    """The entries of Locust's _stats.csv. `live`: the file may be missing or half rewritten; read what is there."""
    try:
        with open(f"{csv_prefix}_stats.csv", newline="") as f:
            return {(row["Type"], row["Name"]): row for row in csv.DictReader(f) if row.get("Request Count")}
    except (FileNotFoundError, csv.Error, KeyError):
        if live:
            return {}
        raise


def _failures(csv_prefix: Path) -> list[dict[str, str]]:
    with open(f"{csv_prefix}_failures.csv", newline="") as f:
        return list(csv.DictReader(f))


def _explain(proc: subprocess.CompletedProcess[str], server: LmserveProcess) -> str:
    return f"locust exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\nserver log:\n" + (
        server.log_path.read_text()[-2000:]
    )


def test_every_scenario_runs_without_failures(lmserve_process: LmserveProcess, tmp_path: Path) -> None:
    prefix = tmp_path / "smoke"
    # Two users of each of the five classes; a think time keeps the tokenize users from swamping 2 cores.
    proc = _locust_until(lmserve_process, prefix, EVERY_ENTRY, "-u", "10", "-r", "10", "--think-time", "0.5")
    assert proc.returncode == 0, _explain(proc, lmserve_process)
    stats = _stats(prefix)
    for key in EVERY_ENTRY:
        assert key in stats, f"no {key} entry; got {sorted(stats)}\n{_explain(proc, lmserve_process)}"
        assert int(stats[key]["Request Count"]) >= 1
        assert int(stats[key]["Failure Count"]) == 0, key
    assert int(stats[("", "Aggregated")]["Failure Count"]) == 0
    assert _failures(prefix) == []
    # Under max_queue nothing is shed, so no entry of expected rejections either.
    assert not [key for key in stats if "expected" in key[1]]
    # TTFT is one sample per stream, ITL one per gap between its token chunks.
    for name in ("chat stream", "grpc ChatStream"):
        assert int(stats[("ITL", name)]["Request Count"]) >= int(stats[("TTFT", name)]["Request Count"])
        assert 0 < float(stats[("TTFT", name)]["Median Response Time"])
    stream_total = ("POST", "chat stream")
    assert float(stats[stream_total]["Average Response Time"]) >= float(stats[("TTFT", "chat stream")]["Average Response Time"])


def test_overload_shape_sheds_with_503_and_fails_nothing(lmserve_process: LmserveProcess, tmp_path: Path) -> None:
    prefix = tmp_path / "overload"
    # 8, 16, then 24 users against max_queue 8: the server must shed load with 503 / UNAVAILABLE + Retry-After.
    proc = _locust(
        "overload.py", lmserve_process, prefix,
        "--overload-peak-users", "24", "--overload-step-users", "8", "--overload-step-seconds", "1.5",
        "--overload-hold-seconds", "2", "--tags", "generation", classes=("ChatStreamUser", "GrpcUser"),
    )
    assert proc.returncode == 0, _explain(proc, lmserve_process)
    stats = _stats(prefix)
    assert _failures(prefix) == []
    assert int(stats[("", "Aggregated")]["Failure Count"]) == 0
    rejected = {key: int(row["Request Count"]) for key, row in stats.items() if "expected" in key[1]}
    assert rejected, f"no request was shed at 3x max_queue: {sorted(stats)}"
    assert set(rejected) <= {
        ("POST", "chat stream [503 expected]"),
        ("gRPC", "ChatStream [UNAVAILABLE expected]"),
        ("gRPC", "Complete [UNAVAILABLE expected]"),
    }
    assert int(stats[("POST", "chat stream")]["Request Count"]) >= 1  # some were served meanwhile


def test_sweep_writes_json_and_chart(lmserve_process: LmserveProcess, tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    argv = [
        sys.executable, str(LOADTESTS / "sweep.py"), "--server", f"lmserve={lmserve_process.url}",
        "--api-key", lmserve_process.api_key, "--tokenizer", str(lmserve_process.tokenizer_dir),
        "--concurrency", "1", "2", "--requests-per-user", "1", "--min-requests", "2",
        "--input-len", "16", "--output-len", str(OUTPUT_TOKENS), "--json", str(out),
    ]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, _explain(proc, lmserve_process)
    run = json.loads(out.read_text())
    (server,) = run["servers"]
    assert server["model"] == "smollm2-135m-instruct"
    assert [p["concurrency"] for p in server["points"]] == [1, 2]
    for point in server["points"]:
        num = 2
        assert point["num_requests"] == num and point["num_failed"] == 0
        assert point["output_tokens"] == num * OUTPUT_TOKENS
        assert point["mean_prompt_tokens"] == 16  # prompts cut to exactly --input-len tokens
        assert 0 < point["ttft_ms"]["p50"] <= point["ttft_ms"]["p99"] <= point["e2e_ms"]["p99"]
        assert point["tpot_ms"]["p50"] > 0 and point["output_tok_s"] > 0
        assert point["output_tok_s"] == point["output_tokens"] / point["duration_s"]
        locust_total = point["locust_stats"]["POST completion stream"]
        assert locust_total["num_requests"] == num and locust_total["num_failures"] == 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
