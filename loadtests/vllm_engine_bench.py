"""`lmserve serve --engine vllm` against vLLM's own OpenAI server, side by side, with `vllm bench serve`.

Both serve the same folder with the same engine settings (bf16, 2,048-token context, 4 GiB of KV cache,
vLLM's defaults otherwise); one server runs at a time, and each round starts each server afresh and
loads it at every concurrency (random 128-token prompts, 128 output tokens, ignore_eos, seed 0; 8
prompts at concurrency 1, 4 x concurrency otherwise), alternating which goes first, so a drift of the
shared machine falls on both. Run it with the vLLM venv's python (`make vllm-venv`):

    .vllm-venv/bin/python loadtests/vllm_engine_bench.py --model DIR [--rounds 2] [--concurrency 1 16 64]
        [--both-cores] [--json results.json]

DIR: `lmserve export smollm2-135m-instruct DIR`. `--both-cores` gives both engines both cores
(VLLM_CPU_OMP_THREADS_BIND=0-1); by default vLLM's CPU engine takes one and leaves one to the API server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
PEER_SCRIPT = REPO_ROOT.parent / "shared" / "peers" / "vllm-cpu.sh"
START_TIMEOUT_S = 1800.0
BENCH_TIMEOUT_S = 1800.0
MAX_MODEL_LEN = 2048
KV_CACHE_GIB = 4  # vllm-cpu.sh's VLLM_CPU_KVCACHE_SPACE default

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _argv(server: str, model: Path, port: int) -> tuple[list[str], str]:
    """The server's command line and the path that answers 200 once it serves."""
    if server == "vllm":
        return [str(PEER_SCRIPT), "serve", str(model), str(port)], "/health"
    return [
        sys.executable, "-m", "service", "serve", "--engine", "vllm", "--model", str(model), "--dtype", "bfloat16",
        "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", str(KV_CACHE_GIB), "--embedding-model", "none",
        "--port", str(port), "--grpc-port", "0", "--log-level", "warning",
    ], "/readyz"  # fmt: skip


def _served_name(base_url: str) -> str:
    return str(httpx.get(base_url + "/v1/models", timeout=30).json()["data"][0]["id"])


def run_server(server: str, model: Path, concurrencies: list[int], round_index: int, env: dict[str, str], log_dir: Path) -> list[Point]:
    port = _free_port()
    argv, ready_path = _argv(server, model, port)
    base_url = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"{server}-round{round_index}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{server} exited with {process.returncode}; see {log_path}")
            try:
                if httpx.get(base_url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{server} did not start; see {log_path}")
            time.sleep(2)
        name = _served_name(base_url)
        points = []
        for concurrency in concurrencies:
            num_prompts = 8 if concurrency == 1 else 4 * concurrency
            result = subprocess.run(
                [str(PEER_SCRIPT), "bench", base_url, name, str(model), str(concurrency), str(num_prompts)],
                env=env, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
            )  # fmt: skip
            (log_dir / f"{server}-round{round_index}-c{concurrency}.txt").write_text(result.stdout + result.stderr)
            values = {}
            for field, pattern in _FIELDS.items():
                match = re.search(pattern, result.stdout)
                values[field] = float(match.group(1)) if match else (0.0 if field == "num_failed" else float("nan"))
            point = Point(
                server, round_index, concurrency, num_prompts, int(values["num_ok"]), int(values["num_failed"]),
                values["output_tok_s"], values["median_ttft_ms"], values["median_tpot_ms"],
            )  # fmt: skip
            print(json.dumps(asdict(point)), flush=True)
            points.append(point)
        return points
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def table(points: list[Point], concurrencies: list[int]) -> str:
    rows = [
        "| round | concurrency | lmserve --engine vllm tok/s | vllm serve tok/s | ratio | median TTFT lmserve / vLLM | "
        "median TPOT lmserve / vLLM |",
        "|---|---|---|---|---|---|---|",
    ]
    for round_index in sorted({p.round for p in points}):
        for concurrency in concurrencies:
            ours = next(p for p in points if p.round == round_index and p.concurrency == concurrency and p.server == "lmserve")
            theirs = next(p for p in points if p.round == round_index and p.concurrency == concurrency and p.server == "vllm")
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
    parser.add_argument("--both-cores", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/vllm_engine_bench"))
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PEER_DTYPE="bfloat16", PEER_MAX_LEN=str(MAX_MODEL_LEN))
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # each server gets 4 GiB its own way (the peer script sets it)
    # vLLM 0.32's CPU build cannot load its AOT-compiled model back and recompiles for minutes at every
    # start; torch.compile's own cache works. Both servers run the same compiled model either way.
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    if args.both_cores:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"
    points: list[Point] = []
    for round_index in range(1, args.rounds + 1):
        order = ["lmserve", "vllm"] if round_index % 2 else ["vllm", "lmserve"]
        for server in order:
            points += run_server(server, args.model, args.concurrency, round_index, env, args.log_dir)
    print(table(points, args.concurrency))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(p) for p in points], indent=1))
    return 0 if all(p.num_failed == 0 and p.num_ok == p.num_prompts for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
