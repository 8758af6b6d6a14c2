"""Streamed generation with the safety filter on against off, on one machine, back to back.

    .venv/bin/python loadtests/safety_throughput.py [--concurrency 16] [--rounds 2]

Starts `lmserve serve` twice (the default policy, then `--no-safety`; each once per round, in alternating
order), drives each with the same HTTP SSE load as loadtests/grpc_vs_http.py (random token prompts of
--input-len, --output-len tokens each, ignore_eos, greedy), and prints output tokens/s, median TTFT
(first text released) and TPOT for each, and the ratio on / off.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess

from grpc_vs_http import Result, _free_port, _prompts, run_streams, start_server


def measure(extra: list[str], args: argparse.Namespace) -> Result:
    http_port, grpc_port = _free_port(), _free_port()
    proc = start_server(http_port, grpc_port, extra)
    try:
        asyncio.run(run_streams("http", http_port, 2, _prompts(2, args.input_len, 99), 8))  # warm-up
        prompts = _prompts(args.concurrency * args.requests_per_user, args.input_len, seed=args.concurrency)
        return asyncio.run(run_streams("http", http_port, args.concurrency, prompts, args.output_len))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests-per-user", type=int, default=2)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[Result]] = {"on": [], "off": []}
    for round_index in range(args.rounds):
        order = ("on", "off") if round_index % 2 == 0 else ("off", "on")
        for mode in order:
            result = measure(["--no-safety"] if mode == "off" else [], args)
            runs[mode].append(result)
            print(
                f"round {round_index} safety {mode:3s}: {result.tokens_per_s:7.1f} tok/s, "
                f"TTFT {result.ttft_ms:7.1f} ms, TPOT {result.tpot_ms:6.1f} ms",
                flush=True,
            )
    on = statistics.mean(r.tokens_per_s for r in runs["on"])
    off = statistics.mean(r.tokens_per_s for r in runs["off"])
    print(f"\nconcurrency {args.concurrency}: filter on {on:.1f} tok/s, off {off:.1f} tok/s, on / off {on / off:.3f}")
    for mode in ("on", "off"):
        ttft = statistics.mean(r.ttft_ms for r in runs[mode])
        tpot = statistics.mean(r.tpot_ms for r in runs[mode])
        print(f"  {mode}: median TTFT {ttft:.0f} ms, median TPOT {tpot:.1f} ms")


if __name__ == "__main__":
    main()
