"""Perplexity of a model over a fixed text, for each --quantization mode, through the engine's own forward.

    .venv/bin/python benchmarks/perplexity.py [--model smollm2-135m-instruct] [--dtype float32]
        [--text tests/data/perplexity/kjv_ruth_jonah.txt] [--window 512] [--modes none int8 q4_1] [--chunk 16]

A mode may name its own activations' dtype, MODE:DTYPE (`--modes none int8:bfloat16 none:bfloat16`: int8
with bf16 activations, qgemm_vnni.c, against float32); a bare MODE takes --dtype.

The text is tokenized once (no BOS; the chat template plays no part), cut into non-overlapping windows of
--window tokens, and each window is one fresh prefill through ModelRunner (the paged KV cache, the forward
path the server would pick, the LM head's logits for every position): perplexity = exp(mean negative log
likelihood of each token after the first of its window; with --second-half, of the second half of each
whole window, llama.cpp's llama-perplexity method, for a figure comparable with its own). With --chunk N each
window is fed N tokens a step instead, so that all but its first N tokens attend over the KV cache as
decodes and later prompt chunks do (through the C attention kernel over the cache, where a fresh prefill
takes torch's attention). Prints one line per mode and each mode's ratio to
the first mode's perplexity, and its greedy agreement with the first mode: the share of scored positions
whose most likely next token (the argmax of the logits, teacher-forced on the text) is the first mode's; --max-ratio makes the exit status 1 when a ratio exceeds it (the quality guard:
int8 within 2% of float32).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchkit.cli import add_dtype, add_model
from benchkit.repo import REPO_ROOT
from lmserve.checkpoints import resolve_model
from lmserve.config import EngineConfig, default_cache_dir
from lmserve.engine.modeling.attention import SeqLayout
from lmserve.engine.runner import ModelRunner
from lmserve.tokenizer import Tokenizer

DEFAULT_TEXT = REPO_ROOT / "tests" / "data" / "perplexity" / "kjv_ruth_jonah.txt"


@dataclass(frozen=True)
class Perplexity:
    mode: str
    num_tokens: int  # tokens scored
    nll: float  # mean negative log likelihood (nats per token)
    seconds: float
    argmax: list[int]  # each scored position's most likely next token
    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def windows(token_ids: list[int], size: int, full_only: bool = False) -> list[list[int]]:
    """Non-overlapping windows of `size` tokens; a last shorter one is kept if it has at least 2 tokens
    (none with `full_only`, as llama.cpp's perplexity tool counts only whole chunks)."""
    chunks = [token_ids[i : i + size] for i in range(0, len(token_ids), size)]
    return [c for c in chunks if len(c) >= (size if full_only else 2)]


@torch.inference_mode()
def window_nll(runner: ModelRunner, ids: list[int], first: int = 1, chunk: int = 0) -> tuple[float, int, list[int]]:
    """Sum of -log p(token | the window before it) over ids[first:], by one prefill of the window (or of
    `chunk` tokens at a time, each chunk after the first over the cache); the count; each position's argmax."""
    block_size = runner.kv_spec.block_size
    num_blocks = -(-len(ids) // block_size)
    assert num_blocks <= runner.kv_spec.num_blocks, "the KV pool is smaller than one window"
    input_ids = torch.tensor(ids, dtype=torch.long)
    step = chunk or len(ids)
    hidden = torch.cat([
        runner.forward(
            input_ids[start : start + step], torch.arange(start, min(start + step, len(ids))),
            runner.attention_metadata([SeqLayout(0, len(ids[start : start + step]), start, list(range(num_blocks)))]),
        )
        for start in range(0, len(ids), step)
    ])  # fmt: skip
    logits = runner.model.compute_logits(hidden[first - 1 : -1]).float()  # [len - first, vocab]
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = input_ids[first:]
    return -float(log_probs.gather(1, targets[:, None]).sum()), len(ids) - first, logits.argmax(-1).tolist()


def measure(
    model_path: Path, mode: str, dtype: str, token_windows: list[list[int]], cache_dir: Path, second_half: bool = False,
    chunk: int = 0,
) -> Perplexity:
    window = max(len(w) for w in token_windows)
    config = EngineConfig(dtype=dtype, quantization=mode, num_kv_blocks=-(-window // 16) + 1, cache_dir=cache_dir)
    runner = ModelRunner(model_path, config)
    start = time.perf_counter()
    total, count, argmax = 0.0, 0, []
    for ids in token_windows:
        nll, n, top = window_nll(runner, ids, len(ids) // 2 if second_half else 1, chunk)
        total, count = total + nll, count + n
        argmax += top
    return Perplexity(f"{mode}:{dtype}", count, total / count, time.perf_counter() - start, argmax)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model(p)
    add_dtype(p, "float32", allow_auto=False)
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    p.add_argument("--modes", nargs="+", default=["none", "int8"], help="none | int8 | q4_1 | q8_0, each optionally :DTYPE")
    p.add_argument("--second-half", action="store_true",
                   help="llama.cpp's method (llama-perplexity -c WINDOW): whole windows only, each scoring only its "
                   "second half, so figures compare with its Final estimate")  # fmt: skip
    p.add_argument("--max-ratio", type=float, default=None, help="exit 1 if a mode's perplexity / the first's exceeds it")
    p.add_argument("--chunk", type=int, default=0, help="feed each window N tokens a step, over the KV cache (0: whole)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    args = p.parse_args(argv)
    if args.chunk < 0:
        p.error("--chunk must be 0 (whole windows) or a positive number of tokens")
    runs = [(m.partition(":")[0], m.partition(":")[2] or args.dtype) for m in args.modes]
    for mode, dtype in runs:
        if mode not in ("none", "int8", "q4_1", "q8_0") or dtype not in ("float32", "bfloat16"):
            p.error(f"--modes: {mode}:{dtype} is not one of none | int8 | q4_1 | q8_0, :float32 | :bfloat16")

    model_path = resolve_model(args.model, args.cache_dir).path
    tokenizer = Tokenizer.from_folder(model_path)
    token_ids = tokenizer.encode(args.text.read_text(encoding="utf-8"))
    if args.max_tokens:
        token_ids = token_ids[: args.max_tokens]
    token_windows = windows(token_ids, args.window, full_only=args.second_half)
    print(f"{args.text.name}: {len(token_ids)} tokens, {len(token_windows)} windows of up to {args.window}; "
          f"{model_path.name} {args.dtype}" + (f", {args.chunk} tokens a step" if args.chunk else ""))  # fmt: skip
    results = [
        measure(model_path, mode, dtype, token_windows, args.cache_dir, args.second_half, args.chunk)
        for mode, dtype in runs
    ]
    base = results[0].perplexity
    worst = 1.0
    for r in results:
        ratio = r.perplexity / base
        worst = max(worst, ratio)
        agree = sum(a == b for a, b in zip(r.argmax, results[0].argmax, strict=True)) / len(r.argmax)
        print(f"quantization {r.mode:14s}: perplexity {r.perplexity:.4f} over {r.num_tokens} tokens "
              f"(ratio to {results[0].mode}: {ratio:.4f}; greedy agreement {agree:.2%}; {r.seconds:.1f} s)")  # fmt: skip
    if args.max_ratio is not None and worst > args.max_ratio:
        print(f"FAIL: a perplexity ratio of {worst:.4f} exceeds {args.max_ratio}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
