"""Prompt-lookup speculative decoding on an extractive workload: the same engine with and without it, in
the same run.

    .venv/bin/python benchmarks/spec_bench.py --concurrency 1 16 --num-requests 16 --rounds 2

Workload: chat requests "Repeat this paragraph, changing the word X to Y" over paragraphs of this
repository's architecture and operations docs (prose of 40 to 110 words, so the answer repeats most of the prompt; `--num-requests`
distinct prompts, each paragraph once while there are enough), greedy,
max_tokens 160, ending where the model ends. Greedy speculative decoding yields exactly the plain tokens,
so both modes produce the same outputs (checked) and differ only in how many steps they take. Closed loop
with `--concurrency` requests in flight; rounds alternate which mode goes first, so drift on a shared
machine hits both alike. Reported per concurrency: output tokens/s of each mode and their ratio, median
time per output token (TPOT: first token to last, over the tokens after the first), and the acceptance
rate (accepted / drafted tokens, from the engine's counters).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from benchkit.cli import add_concurrency, add_dtype, add_model, add_rounds
from lmserve.checkpoints import resolve_model
from lmserve.config import EngineConfig, default_cache_dir
from lmserve.engine.engine import NativeEngine
from lmserve.types import GenerationRequest, SamplingParams

# Fixed prose: the docs' reference pages, which change rarely (the README is too short to give 16 paragraphs).
SOURCES = [Path(__file__).resolve().parent.parent / "docs" / name for name in ("architecture.md", "operations.md")]


def paragraphs() -> list[str]:
    """Prose of the sources: their paragraphs and list items (no tables, code, headings), 40 to 110 words."""
    text = re.sub(r"```.*?```", "", "\n\n".join(path.read_text() for path in SOURCES), flags=re.S)
    out = []
    for block in re.split(r"\n\s*\n|\n(?=- )", text):
        lines = [line.strip().removeprefix("- ") for line in block.splitlines()]
        if not lines or any(line.startswith(("|", "#", ">")) for line in lines):
            continue
        para = " ".join(lines).replace("`", "")
        if 40 <= len(para.split()) <= 110:
            out.append(para)
    return out


def prompts_for(engine: NativeEngine, num: int) -> list[list[int]]:
    """`num` distinct prompts: the paragraphs in turn, each time with another word to change."""
    texts = paragraphs()
    prompts = []
    for i in range(num):
        paragraph = texts[i % len(texts)]
        words = re.findall(r"[A-Za-z]{5,}", paragraph)
        word = words[(len(words) // 2 + i // len(texts)) % len(words)] if words else "the"
        message = f"Repeat this paragraph exactly, changing only the word '{word}' to 'banana'.\n\n{paragraph}"
        prompts.append(engine.tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True))
    return prompts


@dataclass
class Run:
    tokens: list[list[int]]
    seconds: float
    tpots: list[float]
    drafted: int
    accepted: int

    @property
    def tok_s(self) -> float:
        return sum(len(t) for t in self.tokens) / self.seconds


async def run_mode(engine: NativeEngine, prompts: list[list[int]], concurrency: int, speculative: int) -> Run:
    params = SamplingParams(max_tokens=160, temperature=0.0, speculative_tokens=speculative)
    outputs: list[list[int]] = [[] for _ in prompts]
    tpots: list[float] = []
    queue = list(range(len(prompts)))

    async def worker() -> None:
        while queue:
            i = queue.pop(0)
            first = last = None
            async for delta in engine.generate(GenerationRequest(prompts[i], params, f"r{i}")):
                if delta.token_ids:
                    last = time.perf_counter()
                    first = first or last
                outputs[i].extend(delta.token_ids)
            if first is not None and last is not None and len(outputs[i]) > 1:
                tpots.append((last - first) / (len(outputs[i]) - 1))

    before = engine.stats()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    after = engine.stats()
    return Run(
        outputs,
        seconds,
        tpots,
        after.num_draft_tokens_total - before.num_draft_tokens_total,
        after.num_accepted_tokens_total - before.num_accepted_tokens_total,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model(parser)
    add_dtype(parser, "auto")
    add_concurrency(parser, [1, 16])
    parser.add_argument("--num-requests", type=int, default=16)
    add_rounds(parser, 2)
    parser.add_argument("--speculative-tokens", type=int, default=4)
    args = parser.parse_args()

    resolved = resolve_model(args.model, default_cache_dir())
    engine = NativeEngine.load(resolved.path, resolved.name, EngineConfig(dtype=args.dtype))
    prompts = prompts_for(engine, args.num_requests)
    print(f"{len(prompts)} requests over {min(len(paragraphs()), len(prompts))} doc paragraphs, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"dtype {engine.runner.dtype}, speculative_tokens {args.speculative_tokens}")  # fmt: skip
    await engine.start()
    try:
        await run_mode(engine, prompts[:2], 2, 0)  # warm-up: kernels, allocator, prefix cache of nothing
        for concurrency in args.concurrency:
            runs: dict[str, list[Run]] = {"plain": [], "speculative": []}
            for round_index in range(args.rounds):
                order = ["plain", "speculative"] if round_index % 2 == 0 else ["speculative", "plain"]
                for mode in order:
                    k = args.speculative_tokens if mode == "speculative" else 0
                    runs[mode].append(await run_mode(engine, prompts, concurrency, k))
            plain, spec = runs["plain"], runs["speculative"]
            assert all(r.tokens == plain[0].tokens for r in plain + spec), "speculative greedy changed the output"
            plain_tok_s = statistics.median(r.tok_s for r in plain)
            spec_tok_s = statistics.median(r.tok_s for r in spec)
            plain_tpot = statistics.median(t for r in plain for t in r.tpots) * 1000
            spec_tpot = statistics.median(t for r in spec for t in r.tpots) * 1000
            drafted = sum(r.drafted for r in spec)
            accepted = sum(r.accepted for r in spec)
            per_round = ", ".join(f"{s.tok_s / p.tok_s:.2f}x" for p, s in zip(plain, spec, strict=True))
            print(
                f"concurrency {concurrency}: plain {plain_tok_s:.1f} tok/s, TPOT {plain_tpot:.2f} ms | speculative "
                f"{spec_tok_s:.1f} tok/s, TPOT {spec_tpot:.2f} ms | speed-up {spec_tok_s / plain_tok_s:.2f}x "
                f"(rounds: {per_round}) | acceptance {accepted}/{drafted} = {accepted / max(drafted, 1):.2f} | "
                f"{sum(len(t) for t in plain[0].tokens)} output tokens per run"
            )
    finally:
        await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
