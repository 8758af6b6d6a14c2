"""Headless Locust runs against real lmserve processes: every scenario, the documented run on the default
safety policy, generations the safety filter ends, the overload shape, the sweep.

Each run is a subprocess bounded in time; its CSV statistics (or the sweep's JSON) are read back and
checked entry by entry.
"""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from lmload.entries import generation_only
from tests.loadtests.conftest import LOADTESTS, ROOT, LmserveProcess

PROMPT_TOKENS = 24
OUTPUT_TOKENS = 8
RUN_LIMIT_S = 90  # Locust's own --run-time; a run normally ends long before
RUN_TIMEOUT_S = 180

ALL_CLASSES = ("ChatStreamUser", "CompletionUser", "EmbeddingsUser", "TokenizeUser", "GrpcUser")
EVERY_ENTRY = [
    ("POST", "chat stream"), ("TTFT", "chat stream"), ("ITL", "chat stream"),
    ("POST", "completion"), ("POST", "embeddings"), ("POST", "tokenize"), ("POST", "detokenize"),
    ("gRPC", "Tokenize"), ("gRPC", "Detokenize"), ("gRPC", "Embed"), ("gRPC", "Complete"),
    ("gRPC", "ChatStream"), ("TTFT", "grpc ChatStream"), ("ITL", "grpc ChatStream"),
]
# What the documented run (no class named, no gRPC target) reports.
DOCUMENTED_ENTRIES = [
    ("POST", "chat stream"), ("TTFT", "chat stream"), ("ITL", "chat stream"), ("POST", "completion"), ("POST", "embeddings"),
]
FILTERED_ENTRIES = [
    ("POST", "chat stream [content_filter]"), ("POST", "completion [content_filter]"),
    ("gRPC", "ChatStream [content_filter]"), ("gRPC", "Complete [content_filter]"),
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
    server: LmserveProcess,
    csv_prefix: Path,
    entries: list[tuple[str, str]],
    *args: str,
    classes: tuple[str, ...] = (),
    grpc: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Runs locustfile.py until its live CSV holds every one of `entries` (then SIGTERM: Locust's graceful
    stop, in-flight requests finishing within --stop-timeout), or until its --run-time ends. A run takes
    as long as this machine needs to serve each scenario once, not a fixed time. `grpc` False: no gRPC
    target in the environment."""
    argv = _argv("locustfile.py", server, csv_prefix, "-t", f"{RUN_LIMIT_S}s", *args, classes=classes)
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=server.env(grpc), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
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


def _count(stats: dict[tuple[str, str], dict[str, str]], key: tuple[str, str], column: str = "Request Count") -> int:
    return int(stats[key][column]) if key in stats else 0


def _assert_aggregated_counts_generation_only(stats: dict[tuple[str, str], dict[str, str]], side_rows: bool = True) -> None:
    """The Aggregated row is the sum of the generation entries: no TTFT, ITL, embeddings or tokenize
    (`side_rows`: the run has some of those, so that the sum tells)."""
    rows = {key: row for key, row in stats.items() if key != ("", "Aggregated")}
    generation = [key for key in rows if generation_only(*key)]
    assert generation, sorted(rows)
    if side_rows:
        assert [key for key in rows if key not in generation], f"no entry apart from generation: {sorted(rows)}"
    for column in ("Request Count", "Failure Count"):
        assert _count(stats, ("", "Aggregated"), column) == sum(int(rows[key][column]) for key in generation), (
            column, sorted(rows))


def _spawned(proc: subprocess.CompletedProcess[str]) -> set[str]:
    """The user classes Locust spawned, from its "All users spawned: {...}" line."""
    found = re.search(r"All users spawned: (\{.*?\})", proc.stderr)
    assert found, proc.stderr[-2000:]
    return {name for name, count in json.loads(found.group(1)).items() if count > 0}


def test_every_scenario_runs_without_failures(lmserve_process: LmserveProcess, tmp_path: Path) -> None:
    prefix = tmp_path / "smoke"
    # Two users of each of the five classes, named (TokenizeUser runs only when asked for); a think time
    # keeps the tokenize users from swamping 2 cores.
    proc = _locust_until(
        lmserve_process, prefix, EVERY_ENTRY, "-u", "10", "-r", "10", "--think-time", "0.5", classes=ALL_CLASSES
    )
    assert proc.returncode == 0, _explain(proc, lmserve_process)
    assert _spawned(proc) == set(ALL_CLASSES)
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
    # Without the safety filter and with ignore_eos, every generation ran to max_tokens: no [stop] or
    # [content_filter] entry.
    assert not [key for key in stats if "[" in key[1]]
    _assert_aggregated_counts_generation_only(stats)


def test_documented_run_on_the_default_policy(lmserve_default_policy: LmserveProcess, tmp_path: Path) -> None:
    """The run as the README writes it, against a server with the packaged safety policy: no class named,
    no gRPC target, more users than classes that can run."""
    server, prefix = lmserve_default_policy, tmp_path / "documented"
    proc = _locust_until(server, prefix, DOCUMENTED_ENTRIES, "-u", "5", "-r", "5", "--think-time", "0.5", grpc=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, _explain(proc, server)
    assert "Traceback" not in output, _explain(proc, server)
    # No gRPC user without a target, no tokenize user unless named: the five users are all of the others.
    assert _spawned(proc) == {"ChatStreamUser", "CompletionUser", "EmbeddingsUser"}
    assert "GrpcUser not spawned: no gRPC target" in proc.stderr
    stats = _stats(prefix)
    assert not [key for key in stats if key[0] == "gRPC" or "tokenize" in key[1]], sorted(stats)
    for key in DOCUMENTED_ENTRIES:
        assert _count(stats, key) >= 1 and _count(stats, key, "Failure Count") == 0, (key, sorted(stats))
    # The toxicity filter may end a random prompt's output: such a generation has an entry of its own and
    # is no failure (nothing failed at all).
    assert _failures(prefix) == [], _explain(proc, server)
    for key in stats:
        if "[" in key[1]:
            assert key[1].endswith("[content_filter]") and generation_only(*key), key
    _assert_aggregated_counts_generation_only(stats)
    assert re.search(r"Aggregated: \d+ generation requests", output), output[-2000:]


def test_filtered_generations_are_counted_apart_and_pass(lmserve_filtering: LmserveProcess, tmp_path: Path) -> None:
    """Against a policy that blocks all output, every generation ends with content_filter: each is
    reported under its [content_filter] entry as a success, the run exits 0, and no TTFT or ITL comes
    from a stream the filter cut short."""
    server, prefix = lmserve_filtering, tmp_path / "filtered"
    proc = _locust_until(
        server, prefix, FILTERED_ENTRIES, "--tags", "generation", "-u", "3", "-r", "3",
        classes=("ChatStreamUser", "CompletionUser", "GrpcUser"),
    )
    assert proc.returncode == 0, _explain(proc, server)
    assert "Traceback" not in proc.stdout + proc.stderr
    stats = _stats(prefix)
    assert _failures(prefix) == [], _explain(proc, server)
    for key in FILTERED_ENTRIES:
        assert _count(stats, key) >= 1 and _count(stats, key, "Failure Count") == 0, (key, sorted(stats))
    for stream, latency_name in ((("POST", "chat stream"), "chat stream"), (("gRPC", "ChatStream"), "grpc ChatStream")):
        # TTFT and ITL only from the streams that ran to max_tokens (none, or a rare output of blanks).
        assert _count(stats, ("TTFT", latency_name)) == _count(stats, stream), sorted(stats)
    _assert_aggregated_counts_generation_only(stats, side_rows=False)
    filtered = sum(_count(stats, key) for key in stats if key[1].endswith("[content_filter]"))
    assert f"(content_filter, not failures): {filtered}." in proc.stdout + proc.stderr


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
