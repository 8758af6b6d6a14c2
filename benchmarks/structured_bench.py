"""Structured outputs: engine throughput with every request constrained by a JSON schema, against the same
engine unconstrained in the same run; and per-schema compile time.

    .venv/bin/python benchmarks/structured_bench.py --concurrency 16 --num-requests 32 --rounds 2

Throughput: `--num-requests` chat requests ("Describe a customer as JSON."), `--concurrency` in flight
(closed loop), temperature 1, the same seeds every round. Constrained requests follow MID_SCHEMA (a
mid-sized schema: 10 properties, a nested object, an array of objects, enums, bounded numbers and strings)
and end when the JSON is complete. Unconstrained request i then generates exactly as many tokens as
constrained request i did in the first constrained run (ignore_eos), so that both modes have the same
lengths and drain their batches through the same tail: the difference is what the constraint costs per
step. Rounds alternate which mode goes first, so drift on a shared machine hits both alike. Reported:
output tokens/s of each and their ratio.

Compile time: `--num-schemas` distinct random schemas (objects, arrays, enums, nested, bounded numbers and
strings), each timed from the constraint to a matcher ready for its first token (grammar, validation, and
llguidance's parser) and separately to its first mask, after the token trie is built (timed once, reported).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

from benchkit.cli import add_concurrency, add_dtype, add_model, add_rounds
from lmserve.checkpoints import resolve_model
from lmserve.config import EngineConfig, default_cache_dir
from lmserve.engine.engine import NativeEngine
from lmserve.engine.grammar import GrammarCompiler, allocate_bitmask, fill_bitmask
from lmserve.types import ConstraintKind, GenerationRequest, SamplingParams, StructuredOutput

MID_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "maxLength": 60},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 60},
                "city": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "maxLength": 10},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "orders": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 12},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["id", "name", "email", "age", "score", "active", "role", "tags", "address", "orders"],
    "additionalProperties": False,
}


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["object", "array", "string", "integer", "number", "boolean", "enum"] if depth < 3 else ["string", "integer", "number", "boolean", "enum"]
    kind = "object" if depth == 0 else rng.choice(kinds)
    if kind == "object":
        props = {f"field_{i}_{rng.randint(0, 999)}": random_schema(rng, depth + 1) for i in range(rng.randint(1, 6))}
        return {"type": "object", "properties": props, "required": [k for k in props if rng.random() < 0.6], "additionalProperties": False}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(1, 5)}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 3), "maxLength": rng.randint(4, 64)}
    if kind == "integer":
        low = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 10000)}
    if kind == "number":
        low = round(rng.uniform(-100, 100), 2)
        return {"type": "number", "minimum": low, "maximum": low + 500}
    if kind == "boolean":
        return {"type": "boolean"}
    return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True, "x y"], rng.randint(1, 4))}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def run_point(
    engine: NativeEngine, prompt: list[int], args: argparse.Namespace, lengths: list[int] | None, seed0: int
) -> dict:
    """Constrained requests when `lengths` is None; else unconstrained ones, request i exactly lengths[i] tokens."""
    constrained = lengths is None
    structured = StructuredOutput(ConstraintKind.JSON_SCHEMA, json.dumps(MID_SCHEMA)) if constrained else None
    sem = asyncio.Semaphore(args.concurrency)
    num_tokens = 0
    num_valid = 0
    out_lengths = [0] * args.num_requests

    async def one(i: int) -> None:
        nonlocal num_tokens, num_valid
        params = SamplingParams(
            max_tokens=args.max_tokens if lengths is None else lengths[i],
            temperature=1.0,
            seed=seed0 + i,
            ignore_eos=not constrained,
            structured=structured,
        )
        async with sem:
            parts = []
            async for delta in engine.generate(GenerationRequest(prompt, params, f"s{i}")):
                num_tokens += len(delta.token_ids)
                out_lengths[i] += len(delta.token_ids)
                parts.append(delta.text)
        if constrained:
            try:
                json.loads("".join(parts))
                num_valid += 1
            except ValueError:
                pass

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.num_requests)))
    elapsed = time.perf_counter() - start
    return {"tokens": num_tokens, "seconds": elapsed, "tok_s": num_tokens / elapsed, "valid": num_valid, "lengths": out_lengths}


def compile_times(compiler: GrammarCompiler, num_schemas: int) -> None:
    started = time.perf_counter()
    compiler.ll_tokenizer()
    print(f"token trie (once per process): {time.perf_counter() - started:.2f} s")
    rng = random.Random(0)
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    to_ready, to_mask = [], []
    for _ in range(num_schemas):
        constraint = StructuredOutput(ConstraintKind.JSON_SCHEMA, json.dumps(random_schema(rng)))
        start = time.perf_counter()
        matcher = compiler.matcher(constraint)
        ready = time.perf_counter()
        fill_bitmask([matcher], bitmask)
        to_ready.append(ready - start)
        to_mask.append(time.perf_counter() - start)
    mid = StructuredOutput(ConstraintKind.JSON_SCHEMA, json.dumps(MID_SCHEMA))
    start = time.perf_counter()
    compiler.matcher(mid)
    mid_s = time.perf_counter() - start
    print(
        f"compile, {num_schemas} random schemas: p50 {1000 * statistics.median(to_ready):.2f} ms, "
        f"p99 {1000 * pct(to_ready, 99):.2f} ms; to first mask p50 {1000 * statistics.median(to_mask):.2f} ms, "
        f"p99 {1000 * pct(to_mask, 99):.2f} ms; MID_SCHEMA {1000 * mid_s:.2f} ms"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model(p)
    add_dtype(p, "auto")
    add_concurrency(p, 16)
    p.add_argument("--num-requests", type=int, default=48, help="per mode and round")
    add_rounds(p, 2)
    p.add_argument("--max-tokens", type=int, default=400, help="constrained requests' cap (the schema bounds them)")
    p.add_argument("--num-schemas", type=int, default=200)
    args = p.parse_args()

    model_dir = resolve_model(args.model, default_cache_dir()).path
    engine = NativeEngine.load(model_dir, args.model, EngineConfig(dtype=args.dtype, max_num_seqs=args.concurrency))
    compile_times(GrammarCompiler(engine.tokenizer, engine.runner.vocab_size), args.num_schemas)
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe a customer of a bookshop as JSON."}], add_generation_prompt=True
    )

    async def run() -> None:
        await engine.start()
        try:
            # Warm-up: the engine's trie and this schema's grammar, and the kernels.
            warm = argparse.Namespace(**{**vars(args), "num_requests": 2})
            await run_point(engine, prompt, warm, None, 10_000)
            await run_point(engine, prompt, warm, [64, 64], 10_000)
            totals = {True: [0, 0.0], False: [0, 0.0]}
            # Every round sends the same seeded requests. The first constrained run fixes each request's
            # length; the unconstrained request i then generates exactly that many tokens (ignore_eos), so
            # both modes drain their batches alike and the difference is the constraint's alone.
            lengths: list[int] | None = None
            for r in range(args.rounds):
                for constrained in (True, False) if r % 2 == 0 else (False, True):
                    res = await run_point(engine, prompt, args, None if constrained else lengths, 1000)
                    if constrained and lengths is None:
                        lengths = res["lengths"]
                    totals[constrained][0] += res["tokens"]
                    totals[constrained][1] += res["seconds"]
                    label = "constrained  " if constrained else "unconstrained"
                    extra = f", {res['valid']}/{args.num_requests} parse as JSON" if constrained else ""
                    print(f"round {r} {label}: {res['tokens']} tokens in {res['seconds']:.1f} s = {res['tok_s']:.1f} tok/s{extra}")
            c = totals[True][0] / totals[True][1]
            u = totals[False][0] / totals[False][1]
            print(f"concurrency {args.concurrency}: constrained {c:.1f} tok/s, unconstrained {u:.1f} tok/s, ratio {c / u:.2f}x")
        finally:
            await engine.stop()

    asyncio.run(run())


if __name__ == "__main__":
    main()
