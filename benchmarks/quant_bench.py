"""Time per output token of `lmserve serve --quantization int8` against the float paths, in one run.

    .venv/bin/python benchmarks/quant_bench.py [--model smollm2-135m-instruct] [--requests 8] [--rounds 2]
        [--input-len 128] [--output-len 128] [--configs none:auto none:float32 int8:float32] [--json out.json]

Each configuration (QUANTIZATION:DTYPE[:ENGINE_THREADS], or `llamacpp`: llama.cpp's llama-server on the same model's GGUF file
at its own precision, --llama-server) is one server process (safety filter off, no embedding
model, gRPC off), started, measured and stopped in turn, so only one holds the CPU at a time; the order of
the configurations alternates from round to round, so that a drift of a shared machine falls on all alike.
At concurrency 1: --requests streamed completions of random --input-len-token prompts (seeded, the same
for every configuration), --output-len tokens each (ignore_eos, greedy). Per request, TTFT = the first
token's arrival, TPOT = (last token's arrival - TTFT) / (output tokens - 1) (vLLM's definition). Prints the
median TTFT and TPOT of each configuration, and each TPOT as a ratio to the first configuration's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from benchkit.cli import add_json_output, add_lengths, add_model, add_rounds
from benchkit.server import ServerCommand, exit_on_sigterm, lmserve_command, serving

START_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Point:
    config: str  # QUANTIZATION:DTYPE
    round: int
    num_requests: int
    median_ttft_ms: float
    median_tpot_ms: float


def prompts(num: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49152) for _ in range(length)] for _ in range(num)]  # past the special tokens


def one_request(client: httpx.Client, model: str, prompt: list[int], output_len: int) -> tuple[float, float]:
    """(TTFT, TPOT) in seconds of one streamed greedy completion of exactly output_len tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    first = last = None
    num_tokens = 0
    num_text_chunks = 0
    # A fresh connection each time: llama-server may close a kept-alive one just as the next request is sent.
    headers = {"Connection": "close"}
    with client.stream("POST", "/v1/completions", json=body, headers=headers, timeout=REQUEST_TIMEOUT_S) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                num_tokens = int(chunk["usage"]["completion_tokens"])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                last = time.perf_counter()
                first = first if first is not None else last
                num_text_chunks += 1
    num_tokens = num_tokens or num_text_chunks  # a peer without usage in its stream sends a chunk per token
    if first is None or last is None or num_tokens != output_len:
        raise RuntimeError(f"expected {output_len} streamed tokens, got {num_tokens}")
    return first - start, (last - first) / max(num_tokens - 1, 1)


def command(config: str, model: str, port: int, llama_server: Path | None) -> ServerCommand:
    if config == "llamacpp":  # llama.cpp's own server on the GGUF file, at its own precision (one slot)
        assert llama_server is not None, "--llama-server is needed for the llamacpp configuration"
        return ServerCommand([
            str(llama_server), "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(os.cpu_count() or 1),
            "-np", "1", "-c", "4096",
        ], "/health")  # fmt: skip
    quantization, dtype, *threads = config.split(":")
    return lmserve_command(
        port, "--model", model, "--quantization", quantization, "--dtype", dtype, "--no-safety",
        *(["--num-threads", threads[0]] if threads else []),
    )  # fmt: skip


def measure(
    config: str, model: str, requests: list[list[int]], output_len: int, round_index: int, log_dir: Path,
    llama_server: Path | None = None,
) -> Point:
    log_path = log_dir / f"{config.replace(':', '-')}.log"
    with serving(config, lambda port: command(config, model, port, llama_server), log_path=log_path,
                 timeout_s=START_TIMEOUT_S) as server, httpx.Client(base_url=server.base_url) as client:  # fmt: skip
        one_request(client, server.model, requests[0][:8], 4)  # warm-up, not counted
        times = [one_request(client, server.model, p, output_len) for p in requests]
    ttfts, tpots = zip(*times)
    return Point(config, round_index, len(times), 1000 * statistics.median(ttfts), 1000 * statistics.median(tpots))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model(p)
    p.add_argument("--requests", type=int, default=8, help="measured requests per configuration and round")
    add_rounds(p, 2)
    add_lengths(p)
    p.add_argument("--configs", nargs="+", default=["none:auto", "none:float32", "int8:float32"])
    add_json_output(p)
    p.add_argument("--llama-server", type=Path, default=None,
                   help="llama.cpp's llama-server (../shared/peers/llamacpp.sh setup); with the configuration "
                   "`llamacpp`, it serves --gguf")  # fmt: skip
    p.add_argument("--gguf", type=Path, default=None, help="the GGUF file llama-server serves (default: the bundled model's)")
    args = p.parse_args(argv)
    exit_on_sigterm()
    if args.output_len < 2:
        p.error("--output-len must be at least 2 (TPOT is measured between tokens)")

    requests = prompts(args.requests, args.input_len)
    gguf = args.gguf
    if "llamacpp" in args.configs and gguf is None:
        from lmserve.checkpoints.bundled import require_bundled

        gguf = require_bundled(args.model)
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as tmp:
        for round_index in range(args.rounds):
            order = args.configs if round_index % 2 == 0 else args.configs[::-1]
            for config in order:
                model = str(gguf) if config == "llamacpp" else args.model
                point = measure(config, model, requests, args.output_len, round_index, Path(tmp), args.llama_server)
                points.append(point)
                print(f"round {round_index} {config}: median TTFT {point.median_ttft_ms:.1f} ms, "
                      f"median TPOT {point.median_tpot_ms:.2f} ms", flush=True)  # fmt: skip
    print(f"\n| configuration (quantization:dtype) | median TTFT | median TPOT | TPOT / {args.configs[0]} |")
    print("|---|---|---|---|")
    for config in args.configs:
        mine = [p for p in points if p.config == config]
        base = [p for p in points if p.config == args.configs[0]]
        ttft = statistics.median(p.median_ttft_ms for p in mine)
        tpot = statistics.median(p.median_tpot_ms for p in mine)
        ratio = tpot / statistics.median(p.median_tpot_ms for p in base)
        print(f"| {config} | {ttft:.1f} ms | {tpot:.2f} ms | {ratio:.2f}x |")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(p) for p in points], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
