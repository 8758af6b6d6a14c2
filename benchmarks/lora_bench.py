"""Many LoRA adapters on one base, against the base alone, with vLLM's CPU build doing the same, by
`vllm bench serve` (random 128-token prompts, 128 output tokens, ignore_eos, seed 0; --prompts-factor
(4) x concurrency prompts per point, each sent to the next of the adapters in turn: --lora-assignment
round-robin).

Servers, started one after another and benchmarked one at a time, their order rotating by round:
- base:       `lmserve serve --model DIR --no-safety` (dtype auto), requests to the base;
- lora:       the same with `--lora-modules` of N random rank-R adapters (`--max-loras N`), requests spread
              over the adapters;
- vllm-base:  vLLM's CPU build (`make vllm-venv`), bf16, requests to the base;
- vllm-lora:  vLLM with `--enable-lora --lora-modules ... --max-loras N --max-lora-rank R`, the same spread.

    .venv/bin/python benchmarks/lora_bench.py --model DIR [--adapters 8] [--rank 16] [--targets all-linear]
        [--concurrency 16 64] [--rounds 1] [--servers base lora vllm-base vllm-lora] [--prompts-factor 4]
        [--json out.json]

DIR: `lmserve export smollm2-135m-instruct DIR`. The adapters are random PEFT adapters of DIR (B not zero),
written once to --adapters-dir. Prints each point as JSON, then a table: tokens/s per server and the
ratios lora / base and vllm-lora / vllm-base (each engine's cost of serving adapters) and lora / vllm-lora.
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

SERVERS = ("base", "lora", "vllm-base", "vllm-lora")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model: Path, dest: Path, count: int, rank: int, targets: list[str]) -> dict[str, Path]:
    """`count` random PEFT adapters of `model` (rank `rank`, alpha 2 x rank), made once into `dest`."""
    adapters = {f"lora{i}": dest / f"lora{i}" for i in range(count)}
    if all((p / "adapter_model.safetensors").exists() for p in adapters.values()):
        return adapters
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    for i, path in enumerate(adapters.values()):
        base = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        torch.manual_seed(i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:  # PEFT starts B at zero; a trained adapter's is not
                    param.normal_(0.0, 0.01)
        peft_model.save_pretrained(str(path))
    return adapters


def command(
    server: str, model: Path, port: int, adapters: dict[str, Path], rank: int, vllm_venv: Path
) -> ServerCommand:
    modules = [f"{name}={path}" for name, path in adapters.items()]
    if server.startswith("vllm"):
        lora = []
        if server == "vllm-lora":
            lora = ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(rank), "--lora-modules", *modules]
        return ServerCommand([
            str(vllm_venv / "bin" / "vllm"), "serve", str(model), "--served-model-name", "peer", "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "2048", *lora,
        ], "/health")  # fmt: skip
    lora = ["--lora-modules", *modules, "--max-loras", str(len(adapters)), "--max-lora-rank", str(rank)] if server == "lora" else []
    return lmserve_command(port, "--model", str(model), "--no-safety", *lora)


def table(points: list[Point], concurrencies: list[int], servers: list[str]) -> str:
    def mean(server: str, concurrency: int) -> float:
        values = [p.output_tok_s for p in points if p.server == server and p.concurrency == concurrency]
        return statistics.fmean(values) if values else float("nan")

    pairs = [p for p in (("lora", "base"), ("vllm-lora", "vllm-base"), ("lora", "vllm-lora")) if set(p) <= set(servers)]
    rows = [
        "| concurrency | " + " | ".join(f"{s} tok/s" for s in servers) + " | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |",
        "|---|" + "---|" * (len(servers) + len(pairs)),
    ]
    for c in concurrencies:
        tok = {s: mean(s, c) for s in servers}
        cells = [f"{tok[s]:.1f}" for s in servers] + [f"{tok[a] / tok[b]:.2f}x" for a, b in pairs]
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_folder(parser)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="all-linear", help="all-linear, or comma-separated module names (q_proj,v_proj)")
    parser.add_argument("--adapters-dir", type=Path, default=Path("/tmp/lora_bench/adapters"))
    add_rounds(parser, 1)
    add_concurrency(parser, [16, 64])
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    add_vllm_venv(parser)
    parser.add_argument("--prompts-factor", type=int, default=4, help="prompts per point: this x the concurrency")
    add_json_output(parser)
    add_log_dir(parser, Path("/tmp/lora_bench"))
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    exit_on_sigterm()
    require_vllm(parser, args.vllm_venv)
    targets = ALL_LINEAR if args.targets == "all-linear" else args.targets.split(",")
    folder = args.adapters_dir / f"r{args.rank}-{'-'.join(targets)}"
    adapters = make_adapters(args.model, folder, args.adapters, args.rank, targets)
    env = vllm_cpu_env()

    def start_one(name: str) -> Server:
        return start(
            name, lambda port: command(name, args.model, port, adapters, args.rank, args.vllm_venv), env, args.log_dir
        )

    def point(server: Server, concurrency: int, round_index: int) -> Point:
        num_prompts = args.prompts_factor * concurrency
        spread = []  # on the servers with adapters, the requests go to each adapter in turn
        if server.name.endswith("lora"):
            spread = ["--lora-modules", *adapters, "--lora-assignment", "round-robin"]
        argv = vllm_bench_command(args.vllm_venv, server, args.model, concurrency, num_prompts, *spread)
        return run_bench(argv, server, concurrency, num_prompts, round_index, env, args.log_dir)

    points = run_rounds(args.servers, start_one, point, args.rounds, args.concurrency)
    print(f"{len(adapters)} adapters of rank {args.rank} on {', '.join(targets)}")
    return report(points, table(points, args.concurrency, args.servers), args.json)


if __name__ == "__main__":
    sys.exit(main())
