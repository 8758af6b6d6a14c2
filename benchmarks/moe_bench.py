"""Mixture-of-experts throughput against a dense model of the same active parameter count, on the engine.

    .venv/bin/python benchmarks/moe_bench.py --concurrency 16 --dtype bfloat16

Builds three random-weight checkpoints of one shape (hidden, layers, heads, vocabulary): Mixtral and
Qwen3-MoE with `--experts` experts of `--expert-size` intermediate width, `--top-k` of them per token, and
a dense Llama whose MLP is top-k times an expert's width (the active parameters per token are the same).
Runs each on lmserve's engine at `--concurrency` with random prompts (ignore_eos, greedy) and prints output
tokens/s and the ratio MoE / dense. Bounded: `--num-requests` per model (default 2 x concurrency).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch
import transformers

from benchkit.cli import add_concurrency, add_dtype, add_lengths
from benchkit.engine_load import engine_run, random_prompts
from lmserve.checkpoints import resolve_model
from lmserve.config import EngineConfig, default_cache_dir
from lmserve.engine.engine import NativeEngine


def configs(args: argparse.Namespace) -> dict[str, transformers.PretrainedConfig]:
    shape = dict(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 4, vocab_size=49152, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip
    return {
        "dense llama": transformers.LlamaConfig(intermediate_size=args.top_k * args.expert_size, **shape),
        "mixtral": transformers.MixtralConfig(
            intermediate_size=args.expert_size, num_local_experts=args.experts, num_experts_per_tok=args.top_k, **shape
        ),
        "qwen3-moe": transformers.Qwen3MoeConfig(
            moe_intermediate_size=args.expert_size, intermediate_size=args.expert_size, num_experts=args.experts,
            num_experts_per_tok=args.top_k, norm_topk_prob=True, head_dim=args.hidden // args.heads, **shape,
        ),
    }  # fmt: skip


def build(config: transformers.PretrainedConfig, dest: Path, tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1.0 + 0.05 * torch.randn_like(param) if "norm" in name else 0.02 * torch.randn_like(param))
    model.save_pretrained(dest)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(dest)
    return dest


def active_params(config: transformers.PretrainedConfig) -> int:
    """Parameters one token passes through: attention, norms, the MLP or its top-k experts (embeddings apart)."""
    h, n = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    attention = h * h * 2 + h * kv * 2
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    experts = getattr(config, "num_experts_per_tok", 1)
    return n * (attention + 3 * h * width * experts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_concurrency(parser, 16)
    parser.add_argument("--num-requests", type=int, default=0)
    add_lengths(parser, output_len=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-size", type=int, default=1024)
    add_dtype(parser, "bfloat16", allow_auto=False)
    args = parser.parse_args()
    num_requests = args.num_requests or 2 * args.concurrency
    tokenizer_dir = resolve_model("smollm2-135m-instruct", default_cache_dir()).path
    prompts = random_prompts(num_requests, args.input_len, 49152, seed=1)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in configs(args).items():
            folder = build(config, Path(tmp) / name.replace(" ", "-"), tokenizer_dir)
            engine = NativeEngine.load(folder, name, EngineConfig(dtype=args.dtype, max_num_seqs=args.concurrency))

            async def run(engine: NativeEngine = engine) -> dict:
                await engine.start()
                try:
                    await engine_run(engine, prompts[: args.concurrency], args.concurrency, 8)  # warm-up
                    return await engine_run(engine, prompts, args.concurrency, args.output_len)
                finally:
                    await engine.stop()

            started = time.perf_counter()
            results[name] = asyncio.run(run())
            print(
                f"{name:12s} {engine.runner.architecture.family:22s} active params {active_params(config) / 1e6:6.1f} M  "
                f"{results[name]['tok_s']:8.1f} tok/s  TTFT median {results[name]['ttft_median'] * 1000:7.1f} ms  "
                f"({time.perf_counter() - started:.0f} s, forward: {engine.runner.forward_path.value})",
                flush=True,
            )
            del engine
    dense = results["dense llama"]["tok_s"]
    # A decode step of `concurrency` tokens routes concurrency x top-k (token, expert) pairs: with as many pairs
    # as experts, nearly every expert's weights are read, experts / top-k times the dense MLP's bytes.
    hit = args.experts * (1 - (1 - args.top_k / args.experts) ** args.concurrency)
    print(f"MLP weights read per decode step, MoE / dense: about {hit / args.top_k:.1f}x "
          f"({hit:.1f} of {args.experts} experts hit by {args.concurrency} tokens x top-{args.top_k})")
    for name in ("mixtral", "qwen3-moe"):
        print(f"{name} / dense llama at concurrency {args.concurrency}: {results[name]['tok_s'] / dense:.2f}x")


if __name__ == "__main__":
    main()
