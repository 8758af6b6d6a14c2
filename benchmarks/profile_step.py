"""Where a decode step's time goes, at a given batch size (no HTTP, no engine thread).

    .venv/bin/python benchmarks/profile_step.py --batch 1 16 64 --context 192 [--torch-profile]

Fills the batch with random prompts of `--context` tokens, prefills them, then times decode steps
phase by phase: schedule, runner (metadata + forward + logits), sample, update + detokenize.
With --torch-profile, prints the top operators of the runner's forward for the last batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

import torch

from benchkit.cli import add_dtype, add_model
from lmserve.checkpoints import resolve_model
from lmserve.config import EngineConfig, default_cache_dir
from lmserve.engine.engine import NativeEngine
from lmserve.engine.output import SequenceOutput
from lmserve.engine.request import Request
from lmserve.process import prepare_to_serve
from lmserve.engine.sampler import sample
from lmserve.engine.step_loop import Stream
from lmserve.types import FinishReason, SamplingParams


def fill(engine: NativeEngine, batch: int, context: int, seed: int, temperature: float = 0.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=1024, temperature=temperature, ignore_eos=True)
    for i, prompt in enumerate(torch.randint(100, engine.runner.vocab_size, (batch, context), generator=gen).tolist()):
        req = Request(f"p{seed}-{i}", prompt, params, engine.eos_token_ids)
        stream = Stream(req, SequenceOutput(engine.tokenizer, req, req.request_id), asyncio.Queue(), None)
        engine.steps._streams[req.request_id] = stream
        engine.scheduler.add_request(req)


def timed_step(engine: NativeEngine) -> dict[str, float]:
    t0 = time.perf_counter()
    scheduled = engine.scheduler.schedule()
    t1 = time.perf_counter()
    logits = engine.runner.execute(scheduled).logits
    t2 = time.perf_counter()
    reqs = [s.request for s in scheduled.scheduled if s.is_sampling]
    sampled = sample(logits, reqs, [None] * len(reqs))
    t3 = time.perf_counter()
    # The engine's own loop: detokenize, update, deltas.
    engine.steps._apply_sampled(scheduled, [(req, [tok]) for req, tok in zip(reqs, sampled, strict=True)])
    t4 = time.perf_counter()
    return {"schedule": t1 - t0, "runner": t2 - t1, "sample": t3 - t2, "update+detok": t4 - t3, "total": t4 - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model(parser)
    add_dtype(parser, "auto")
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "q4_1", "q8_0"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, default=192)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--torch-profile", action="store_true")
    parser.add_argument("--thread", action="store_true", help="step from a second thread, as the server's engine does")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; vllm bench serve samples at 1.0")
    args = parser.parse_args()

    resolved = resolve_model(args.model, default_cache_dir())
    engine = NativeEngine.load(resolved.path, resolved.name, EngineConfig(dtype=args.dtype, max_num_seqs=256, quantization=args.quantization))
    print(f"threads={torch.get_num_threads()} dtype={engine.runner.dtype}")
    prepare_to_serve()  # as NativeEngine.start does
    if args.thread:
        worker = threading.Thread(target=measure, args=(engine, args))
        worker.start()
        worker.join()
    else:
        measure(engine, args)


def measure(engine: NativeEngine, args: argparse.Namespace) -> None:
    for batch in args.batch:
        fill(engine, batch, args.context, seed=batch, temperature=args.temperature)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in list(engine.scheduler._running) + list(engine.scheduler._waiting)):
            timed_step(engine)  # prefill (and a few decodes for the early finishers)
        rows = [timed_step(engine) for _ in range(args.steps)]
        med = {k: statistics.median(r[k] for r in rows) * 1000 for k in rows[0]}
        best = min(r["total"] for r in rows) * 1000
        print(f"batch {batch:3d}: " + "  ".join(f"{k} {v:6.2f} ms" for k, v in med.items())
              + f"  -> {batch / med['total'] * 1000:7.1f} tok/s (fastest step {best:.2f} ms)")
        if args.torch_profile and batch == args.batch[-1]:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    timed_step(engine)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        for req in list(engine.scheduler._running) + list(engine.scheduler._waiting):
            engine.scheduler.finish_request(req, FinishReason.ABORT)
        engine.steps._streams.clear()


if __name__ == "__main__":
    main()
