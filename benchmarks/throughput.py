"""Offline engine throughput (no HTTP) against plain transformers `generate`, one request at a time.

    .venv/bin/python benchmarks/throughput.py --concurrency 1 16 64 --input-len 128 --output-len 128
    .venv/bin/python benchmarks/throughput.py --model-impl native transformers --hf-requests 0   # the two paths

Random prompts of `input-len` tokens, exactly `output-len` new tokens each (ignore_eos), greedy.
Prints output tokens/s for lmserve's engine at each concurrency and for HF `generate`, and the ratio.
Bounded: at most `--num-requests` per point (default 2 x concurrency) and `--hf-requests` for HF.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time

import torch
from transformers import AutoModelForCausalLM

from benchkit.cli import add_concurrency, add_dtype, add_lengths, add_model
from benchkit.engine_load import engine_run, random_prompts
from lmserve.checkpoints import resolve_model
from lmserve.config import EngineConfig, default_cache_dir
from lmserve.engine.engine import NativeEngine


def hf_run(model_dir, prompts: list[list[int]], output_len: int, dtype: torch.dtype) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    num_tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=0)
            num_tokens += out.shape[1] - ids.shape[1]
    elapsed = time.perf_counter() - start
    return {"tokens": num_tokens, "seconds": elapsed, "tok_s": num_tokens / elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model(p)
    add_dtype(p, "bfloat16", allow_auto=False)
    add_concurrency(p, [1, 16, 64])
    add_lengths(p)
    p.add_argument("--num-requests", type=int, default=None, help="per point; default 2 x concurrency")
    p.add_argument("--hf-requests", type=int, default=3)
    p.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig().max_num_batched_tokens)
    p.add_argument("--model-impl", nargs="+", default=["auto"], choices=["auto", "native", "transformers"],
                   help="one run per implementation, in this order (docs/model-families.md)")
    args = p.parse_args()

    resolved = resolve_model(args.model, default_cache_dir())
    vocab = None
    hf = None
    for model_impl in args.model_impl:
        config = EngineConfig(dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens, model_impl=model_impl)
        engine = NativeEngine.load(resolved.path, resolved.name, config)
        vocab = engine.runner.vocab_size
        print(f"model {resolved.name} ({engine.runner.architecture.family}, forward: {engine.runner.forward_path.value}) "
              f"dtype {args.dtype} threads {torch.get_num_threads()} KV pool {engine.runner.kv_spec.num_blocks} blocks "
              f"({engine.runner.kv_spec.total_bytes / 2**20:.0f} MiB)")
        if hf is None and args.hf_requests:
            hf = hf_run(resolved.path, random_prompts(args.hf_requests, args.input_len, vocab, 1), args.output_len,
                        getattr(torch, args.dtype))
            print(f"HF generate, one at a time: {hf['tok_s']:.1f} tok/s ({hf['tokens']} tokens in {hf['seconds']:.1f} s)")
        run_points(engine, args, vocab, hf)


def run_points(engine: NativeEngine, args: argparse.Namespace, vocab: int, hf: dict | None) -> None:
    async def points() -> None:
        await engine.start()
        try:
            await engine_run(engine, random_prompts(2, 16, vocab, 2), 2, 4)  # warm-up
            for conc in args.concurrency:
                n = args.num_requests or 2 * conc
                r = await engine_run(engine, random_prompts(n, args.input_len, vocab, 3 + conc), conc, args.output_len)
                rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                versus = f", {r['tok_s'] / hf['tok_s']:5.2f}x HF generate" if hf else ""
                print(f"lmserve engine, concurrency {conc:3d}: {r['tok_s']:7.1f} tok/s, median TTFT "
                      f"{r['ttft_median'] * 1000:6.0f} ms{versus}, peak RSS {rss_mib:.0f} MiB")
        finally:
            await engine.stop()

    asyncio.run(points())


if __name__ == "__main__":
    main()
