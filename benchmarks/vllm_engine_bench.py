"""`lmserve serve --engine vllm` against vLLM's own OpenAI server, side by side, with `vllm bench serve`.

Both serve the same folder with the same engine settings (--dtype, bf16 by default; 2,048-token
context; the same KV cache size; vLLM's defaults otherwise; lmserve's safety filter off, since vLLM has
none and its sentence hold would delay the first token) and run at the same time, but only one is loaded
at any moment: for each round and each concurrency the two are benchmarked back to back (random 128-token
prompts, 128 output tokens, ignore_eos, seed 0; 8 prompts at concurrency 1, 4 x concurrency otherwise
unless --prompts-per-client says otherwise), the order alternating from round to round, so that a drift
of a shared machine falls on both alike. Run it with the vLLM venv's python (`make vllm-venv`):

    .vllm-venv/bin/python benchmarks/vllm_engine_bench.py --model DIR [--rounds 2] [--concurrency 1 16 64]
        [--kv-cache-gib 1] [--dtype bfloat16|float32] [--prompts-per-client 4] [--both-cores] [--json results.json]

DIR: `lmserve export smollm2-135m-instruct DIR`. `--both-cores` gives both engines both cores
(VLLM_CPU_OMP_THREADS_BIND=0-1); by default vLLM's CPU engine takes one and leaves one to the API server.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchkit.cli import add_concurrency, add_dtype, add_json_output, add_log_dir, add_model_folder, add_rounds
from benchkit.repo import REPO_ROOT
from benchkit.server import Server, ServerCommand, exit_on_sigterm, lmserve_command
from benchkit.side_by_side import Point, report, run_bench, run_rounds, start

PEER_SCRIPT = REPO_ROOT.parent / "shared" / "peers" / "vllm-cpu.sh"
MAX_MODEL_LEN = 2048
SERVERS = ("lmserve", "vllm")


def command(server: str, model: Path, port: int, kv_cache_gib: int, dtype: str) -> ServerCommand:
    if server == "vllm":
        return ServerCommand([str(PEER_SCRIPT), "serve", str(model), str(port)], "/health")  # KV: VLLM_CPU_KVCACHE_SPACE
    return lmserve_command(
        port, "--engine", "vllm", "--model", str(model), "--dtype", dtype, "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-cache-memory", str(kv_cache_gib), "--no-safety",
    )  # fmt: skip


def bench(
    server: Server, model: Path, concurrency: int, num_prompts: int, round_index: int, env: dict[str, str], log_dir: Path
) -> Point:
    argv = [
        str(PEER_SCRIPT), "bench", server.base_url, server.model, str(model), str(concurrency), str(num_prompts),
    ]  # fmt: skip
    return run_bench(argv, server, concurrency, num_prompts, round_index, env, log_dir)


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
    add_model_folder(parser)
    add_rounds(parser, 2)
    add_concurrency(parser, [1, 16, 64])
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    add_dtype(
        parser, "bfloat16", allow_auto=False,
        help="both engines' dtype (float32 where the CPU has no bf16: vLLM's CPU build then emulates bf16)",
    )  # fmt: skip
    parser.add_argument("--prompts-per-client", type=int, default=4, help="prompts = this x concurrency (8 at 1)")
    parser.add_argument("--both-cores", action="store_true")
    add_json_output(parser)
    add_log_dir(parser, Path("/tmp/vllm_engine_bench"))
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    exit_on_sigterm()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PEER_DTYPE=args.dtype, PEER_MAX_LEN=str(MAX_MODEL_LEN))
    env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)  # the peer's KV size; lmserve's is its flag
    # vLLM 0.32's CPU build cannot load its AOT-compiled model back and recompiles for minutes at every
    # start; torch.compile's own cache works. Both servers run the same compiled model either way.
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    if args.both_cores:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"
    lmserve_env = {k: v for k, v in env.items() if k != "VLLM_CPU_KVCACHE_SPACE"}

    def start_one(name: str) -> Server:
        return start(
            name, lambda port: command(name, args.model, port, args.kv_cache_gib, args.dtype),
            lmserve_env if name == "lmserve" else env, args.log_dir,
        )  # fmt: skip

    def point(server: Server, concurrency: int, round_index: int) -> Point:
        num_prompts = 8 if concurrency == 1 else args.prompts_per_client * concurrency
        return bench(server, args.model, concurrency, num_prompts, round_index, env, args.log_dir)

    points = run_rounds(list(SERVERS), start_one, point, args.rounds, args.concurrency)
    return report(points, table(points, args.concurrency), args.json)


if __name__ == "__main__":
    sys.exit(main())
