"""Servers benchmarked side by side by vLLM's own load generator, `vllm bench serve`: each started once
(one at a time, as one starting would slow another's benchmark), then per round and concurrency one point
from each, back to back, their order rotated every round so that a shared machine's drift falls on all
alike. vllm_engine_bench.py, int8_bench.py and lora_bench.py are this loop with their own servers."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from benchkit.repo import REPO_ROOT
from benchkit.server import Server, ServerCommand, start_server

START_TIMEOUT_S = 1800.0  # vLLM's CPU build compiles its model at start: minutes on two shared cores
BENCH_TIMEOUT_S = 3600.0

_FIELDS = {
    "num_ok": r"Successful requests:\s+(\d+)",
    "num_failed": r"Failed requests:\s+(\d+)",
    "output_tok_s": r"Output token throughput \(tok/s\):\s+([\d.]+)",
    "median_ttft_ms": r"Median TTFT \(ms\):\s+([\d.]+)",
    "median_tpot_ms": r"Median TPOT \(ms\):\s+([\d.]+)",
}


@dataclass(frozen=True)
class Point:
    server: str
    round: int
    concurrency: int
    num_prompts: int
    num_ok: int
    num_failed: int
    output_tok_s: float
    median_ttft_ms: float
    median_tpot_ms: float


def start(name: str, command_for: Callable[[int], ServerCommand], env: dict[str, str], log_dir: Path) -> Server:
    """One server of the comparison, its output in log_dir/NAME.log."""
    return start_server(name, command_for, env, log_dir / f"{name}.log", START_TIMEOUT_S, poll_s=2)


def add_vllm_venv(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vllm-venv", type=Path, default=REPO_ROOT / ".vllm-venv", help="`make vllm-venv`'s")


def require_vllm(parser: argparse.ArgumentParser, vllm_venv: Path) -> None:
    if not (vllm_venv / "bin" / "vllm").exists():
        parser.error(f"no vLLM in {vllm_venv} (make vllm-venv): its `vllm bench serve` is the load generator")


def vllm_cpu_env() -> dict[str, str]:
    """This environment for servers and `vllm bench serve` from a vLLM venv: offline, vLLM's CPU build with a
    4 GiB KV space."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="4")
    # vLLM 0.32's CPU build cannot load its AOT-compiled model back and recompiles for minutes at every
    # start; torch.compile's own cache works.
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    return env


def vllm_bench_command(
    vllm_venv: Path, server: Server, tokenizer: Path, concurrency: int, num_prompts: int, *extra: str
) -> list[str]:
    """`vllm bench serve` against `server`: random 128-token prompts, 128 tokens out, ignore_eos, seed 0."""
    return [
        str(vllm_venv / "bin" / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", server.base_url,
        "--model", server.model, "--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", "128",
        "--random-output-len", "128", "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--seed", "0", *extra,
    ]  # fmt: skip


def run_bench(
    command: list[str], server: Server, concurrency: int, num_prompts: int, round_index: int, env: dict[str, str],
    log_dir: Path,
) -> Point:  # fmt: skip
    """Run a `vllm bench serve` command line against `server`, keep its output in log_dir, read its figures."""
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    (log_dir / f"{server.name}-round{round_index}-c{concurrency}.txt").write_text(result.stdout + result.stderr)
    values: dict[str, float] = {}
    for field, pattern in _FIELDS.items():
        match = re.search(pattern, result.stdout)
        values[field] = float(match.group(1)) if match else (0.0 if field == "num_failed" else float("nan"))
    return Point(
        server.name, round_index, concurrency, num_prompts, int(values["num_ok"]), int(values["num_failed"]),
        values["output_tok_s"], values["median_ttft_ms"], values["median_tpot_ms"],
    )  # fmt: skip


def run_rounds(
    names: list[str], start_one: Callable[[str], Server], point: Callable[[Server, int, int], Point], rounds: int,
    concurrencies: list[int],
) -> list[Point]:  # fmt: skip
    """Start the servers one at a time, then per round and concurrency one `point(server, concurrency, round)`
    from each, back to back, their order rotated by one each round; each point printed as a JSON line as it
    comes. The servers are stopped however this ends."""
    points: list[Point] = []
    running: dict[str, Server] = {}
    try:
        for name in names:
            running[name] = start_one(name)
        for round_index in range(1, rounds + 1):
            shift = (round_index - 1) % len(names)
            for concurrency in concurrencies:
                for name in names[shift:] + names[:shift]:
                    result = point(running[name], concurrency, round_index)
                    print(json.dumps(asdict(result)), flush=True)
                    points.append(result)
    finally:
        for server in running.values():
            server.stop()
    return points


def report(points: list[Point], table_text: str, json_path: Path | None) -> int:
    """Print the table, write the points as JSON where asked; the exit status: 0 when every request succeeded."""
    print(table_text)
    if json_path is not None:
        json_path.write_text(json.dumps([asdict(p) for p in points], indent=1))
    return 0 if all(p.num_failed == 0 and p.num_ok == p.num_prompts for p in points) else 1
