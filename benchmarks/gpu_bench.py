"""On a CUDA GPU: greedy exactness against transformers, then engine throughput against plain transformers.

    python3 benchmarks/gpu_bench.py --tokenizer DIR [--out DIR]

No weights travel to the GPU machine: the script saves seeded random-weight checkpoints as real folders
(the SmolLM2 tokenizer from --tokenizer beside them) and loads them the way `lmserve serve` does.
1. Exactness, float32: prompts of mixed lengths, all submitted to the engine at once and then one at a
   time, against transformers `generate` one prompt at a time on the same GPU; token for token.
   Checkpoints: a 2-layer tiny Llama (GQA) and a 3-layer tiny Qwen2 (q/k/v biases, tied embeddings),
   the same shapes as the CPU exactness suite's.
2. Throughput, bf16, on a random model of SmolLM2-135M's architecture (the bundled default's shape):
   random 128-token prompts, 128 new tokens each (ignore_eos), greedy. The engine at each concurrency
   (2 x concurrency requests); transformers `generate` on one batch of that many prompts (equal lengths,
   so no padding). Output tokens/s, the ratio, median TTFT, peak GPU memory.
Prints a table last; --out gets results.json. Every section is bounded in requests and tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config  # noqa: E402

from benchkit.cli import add_concurrency, add_lengths  # noqa: E402
from benchkit.engine_load import engine_run, random_prompts  # noqa: E402
from lmserve.config import EngineConfig  # noqa: E402
from lmserve.engine.engine import NativeEngine  # noqa: E402
from lmserve.types import GenerationRequest, SamplingParams  # noqa: E402

VOCAB = 49152  # SmolLM2's tokenizer
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)
SMOLLM2_135M = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                    num_hidden_layers=30, vocab_size=VOCAB, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def save_checkpoint(dest: Path, config, tokenizer_dir: Path, std: float | None) -> Path:
    """A seeded random model as a float32 safetensors folder. std: the tiny models' wide init (logits far
    from uniform, so greedy tokens depend on the prompt); None keeps transformers' own init."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if std is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.copy_(1.0 + 0.1 * torch.randn_like(param))
                else:
                    param.normal_(0.0, std)
    model.save_pretrained(str(dest))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(dest))
    return dest


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new: int, device: str) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    outs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 do_sample=False, eos_token_id=2, pad_token_id=2)
            outs.append(out[0, len(prompt):].tolist())
    return outs


async def engine_greedy(engine: NativeEngine, prompts: list[list[int]], max_new: int, at_once: bool) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_new, temperature=0.0)

    async def one(i: int, prompt: list[int]) -> list[int]:
        tokens: list[int] = []
        async for delta in engine.generate(GenerationRequest(prompt, params, f"x{i}")):
            tokens.extend(delta.token_ids)
        return tokens

    if at_once:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
    return [await one(i, p) for i, p in enumerate(prompts)]


def exactness(name: str, model_dir: Path, device: str, num_prompts: int, max_new: int) -> dict:
    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(1, 200, (num_prompts,), generator=gen).tolist()
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    # A shared 40-token prefix on every other prompt: prefix-cache hits take the cached-context path.
    shared = prompts[0][:40]
    prompts = [shared + p if i % 2 else p for i, p in enumerate(prompts)]
    expected = hf_greedy(model_dir, prompts, max_new, device)
    result = {"model": name, "prompts": len(prompts), "max_new_tokens": max_new}
    # A small token budget forces chunked prefill next to decodes in the concurrent case.
    for case, at_once, budget in (("all at once", True, 256), ("one at a time", False, 512)):
        config = EngineConfig(dtype="float32", device=device, max_num_batched_tokens=budget, num_kv_blocks=2048)
        engine = NativeEngine.load(model_dir, name, config)

        async def run() -> list[list[int]]:
            await engine.start()
            try:
                return await engine_greedy(engine, prompts, max_new, at_once)
            finally:
                await engine.stop()

        got = asyncio.run(run())
        bad = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
        result[case] = {"mismatched_prompts": bad, "tokens_compared": sum(len(e) for e in expected)}
        del engine
        torch.cuda.empty_cache() if device == "cuda" else None
    return result


def hf_batched(model_dir: Path, batch: int, input_len: int, output_len: int, device: str) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    ids = torch.tensor(random_prompts(batch, input_len, VOCAB, 11 + batch), device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=2)
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=4, **{**kwargs, "attention_mask": torch.ones_like(ids[:, :8])})
        sync(device)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kwargs)
        sync(device)
        elapsed = time.perf_counter() - start
    tokens = (out.shape[1] - input_len) * batch
    del model
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def throughput(model_dir: Path, device: str, concurrencies: list[int], input_len: int, output_len: int,
               budget: int, kv_bytes: int) -> list[dict]:
    config = EngineConfig(dtype="bfloat16", device=device, kv_cache_memory_bytes=kv_bytes,
                          max_num_seqs=max(concurrencies), max_num_batched_tokens=budget)
    engine = NativeEngine.load(model_dir, "smollm2-135m-shape", config)
    rows = []

    async def points() -> None:
        await engine.start()
        try:
            await engine_run(engine, random_prompts(4, 16, VOCAB, 2), 4, 8)  # warm-up
            for conc in concurrencies:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                r = await engine_run(engine, random_prompts(2 * conc, input_len, VOCAB, 3 + conc), conc, output_len)
                r["concurrency"] = conc
                r["engine_steps"] = engine.num_steps
                r["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
                rows.append(r)
                print(f"  engine c={conc}: {r['tok_s']:.0f} tok/s", flush=True)
        finally:
            await engine.stop()

    asyncio.run(points())
    kv_mib = engine.runner.kv_spec.total_bytes / 2**20
    del engine
    if device == "cuda":
        torch.cuda.empty_cache()
    for r in rows:
        r["kv_pool_mib"] = kv_mib
        try:
            r["hf"] = hf_batched(model_dir, r["concurrency"], input_len, output_len, device)
        except Exception as exc:  # e.g. out of memory at the largest batch: report, keep the others
            r["hf"] = {"error": repr(exc)}
        print(f"  HF generate batch={r['concurrency']}: {r['hf'].get('tok_s', float('nan')):.0f} tok/s", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", type=Path, required=True, help="a folder holding the SmolLM2 tokenizer")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None)
    add_concurrency(p, [1, 16, 64, 256])
    add_lengths(p)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--kv-cache-gib", type=float, default=8.0)
    p.add_argument("--exact-prompts", type=int, default=24)
    p.add_argument("--exact-new-tokens", type=int, default=24)
    p.add_argument("--layers", type=int, default=30, help="throughput model depth (fewer for a CPU dry run)")
    args = p.parse_args()

    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    print("env", env, flush=True)
    results: dict = {"env": env, "exactness": [], "throughput": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, config in (
            ("tiny-llama", LlamaConfig(num_hidden_layers=2, tie_word_embeddings=False, **TINY)),
            ("tiny-qwen2", Qwen2Config(num_hidden_layers=3, tie_word_embeddings=True, **TINY)),
        ):
            try:
                folder = save_checkpoint(root / name, config, args.tokenizer, std=0.5)
                r = exactness(name, folder, args.device, args.exact_prompts, args.exact_new_tokens)
            except Exception:
                r = {"model": name, "error": traceback.format_exc()}
                print(r["error"], flush=True)
            results["exactness"].append(r)
            print("exactness", json.dumps(r), flush=True)
        try:
            shape = {**SMOLLM2_135M, "num_hidden_layers": args.layers}
            folder = save_checkpoint(root / "smollm2-shape", LlamaConfig(**shape), args.tokenizer, std=None)
            results["throughput"] = throughput(folder, args.device, args.concurrency, args.input_len,
                                               args.output_len, args.max_num_batched_tokens,
                                               int(args.kv_cache_gib * 2**30))
        except Exception:
            results["throughput_error"] = traceback.format_exc()
            print(results["throughput_error"], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| case | result |\n| --- | --- |")
    for r in results["exactness"]:
        for case in ("all at once", "one at a time"):
            if case in r:
                c = r[case]
                verdict = "exact" if not c["mismatched_prompts"] else f"MISMATCH in prompts {c['mismatched_prompts']}"
                print(f"| {r['model']} float32, {case}, {r['prompts']} prompts, {c['tokens_compared']} tokens | {verdict} |")
        if "error" in r:
            print(f"| {r['model']} | ERROR |")
    print("\n| concurrency | lmserve tok/s | HF generate tok/s | ratio | lmserve median TTFT ms | peak GPU MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results["throughput"]:
        hf = r["hf"].get("tok_s")
        ratio = f"{r['tok_s'] / hf:.2f}x" if hf else r["hf"].get("error", "?")[:40]
        peak = f"{r['peak_gpu_mib']:.0f}" if r["peak_gpu_mib"] is not None else "-"
        print(f"| {r['concurrency']} | {r['tok_s']:.0f} | {hf or float('nan'):.0f} | {ratio} | "
              f"{r['ttft_median'] * 1000:.0f} | {peak} |")


if __name__ == "__main__":
    main()
